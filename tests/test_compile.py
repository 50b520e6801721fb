"""torch.compile sees the ops: a compiled transformer with the ACD processor gives the same rollout and mass."""
import torch

from rcgrpo import attach_acd, region_decoupled_noise, rollout
from rcgrpo.testing import TINY_TEXT_LEN, tiny_kontext_pipeline


def test_compiled_transformer_inside_a_capture_matches_eager():
    pipe = tiny_kontext_pipeline(0)
    recorder = attach_acd(pipe.transformer, last_k=4, backend="torch")
    mask = torch.zeros(64)
    mask[10:20] = 1
    noises = region_decoupled_noise((64, 16), mask[:, None], group_size=2, generator=torch.Generator().manual_seed(0))
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_steps=2, guidance_scale=2.5, height=32, width=32, max_sequence_length=TINY_TEXT_LEN)
    with recorder.capture(mask) as cap:
        eager = rollout(pipe, image, "make it red", noises, **kwargs)
    eager_mass = cap.mass.clone()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    with recorder.capture(mask) as cap:
        compiled = rollout(pipe, image, "make it red", noises, **kwargs)
    torch.testing.assert_close(compiled.states, eager.states, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cap.mass, eager_mass, rtol=1e-6, atol=1e-7)
    assert cap.num_calls == 8
