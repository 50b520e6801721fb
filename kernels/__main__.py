"""`python -m rcgrpo_kernels`: print which backends can run here and why not."""
import torch

from . import available_backends


def main() -> None:
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for name, reason in available_backends().items():
        print(f"  {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")


if __name__ == "__main__":
    main()
