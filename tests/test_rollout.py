"""The rollout is the pipeline's own deterministic Euler ODE (SPEC §4)."""
import pytest
import torch

from rcgrpo.method.rdp import region_decoupled_noise
from rcgrpo.editors.flux_kontext.rollout import latent_shape, predict_velocity, rollout
from rcgrpo.editors.latents import euler_step
from rcgrpo.testing import TINY_TEXT_LEN, tiny_kontext_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_kontext_pipeline(0)


def _inputs(pipe, group=4, seed=0):
    n_img, c = latent_shape(pipe, 32, 32)
    mask = torch.zeros(n_img)
    mask[10:20] = 1
    noises = region_decoupled_noise((n_img, c), mask[:, None], group_size=group,
                                    generator=torch.Generator().manual_seed(seed))
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return image, noises


def _run(pipe, image, noises, steps=4):
    return rollout(pipe, image, "make the square red", noises, num_steps=steps, guidance_scale=2.5,
                   height=32, width=32, max_sequence_length=TINY_TEXT_LEN)


def test_states_shapes_and_deterministic(pipe):
    image, noises = _inputs(pipe)
    a = _run(pipe, image, noises)
    b = _run(pipe, image, noises)
    assert a.states.shape == (4, 5, 64, 16)
    torch.testing.assert_close(a.states[:, 0], noises, rtol=0, atol=0)
    torch.testing.assert_close(a.states, b.states, rtol=0, atol=0)
    assert float(a.sigmas[0]) == 1.0 and float(a.sigmas[-1]) == 0.0
    assert a.images.shape == (4, 3, 32, 32)


def test_final_state_decodes_to_stock_pipeline_image(pipe):
    image, noises = _inputs(pipe)
    res = _run(pipe, image, noises)
    stock = pipe(image=image, prompt="make the square red", height=32, width=32, num_inference_steps=4,
                 guidance_scale=2.5, latents=noises, num_images_per_prompt=4, max_area=32 * 32,
                 _auto_resize=False, max_sequence_length=TINY_TEXT_LEN, output_type="pt").images
    torch.testing.assert_close(res.images, stock, rtol=0, atol=0)
    stock_latents = pipe(image=image, prompt="make the square red", height=32, width=32, num_inference_steps=4,
                         guidance_scale=2.5, latents=noises, num_images_per_prompt=4, max_area=32 * 32,
                         _auto_resize=False, max_sequence_length=TINY_TEXT_LEN, output_type="latent").images
    torch.testing.assert_close(res.states[:, -1], stock_latents, rtol=0, atol=0)


def test_each_transition_is_an_euler_step_of_the_captured_conditioning(pipe):
    image, noises = _inputs(pipe, group=3)
    res = _run(pipe, image, noises, steps=3)
    assert res.conditioning.text_len == TINY_TEXT_LEN
    for j in range(3):
        v = predict_velocity(pipe.transformer, res.conditioning, res.states[:, j], res.timesteps[j].expand(3))
        x_next = euler_step(res.states[:, j], v, res.sigmas[j], res.sigmas[j + 1])
        torch.testing.assert_close(x_next, res.states[:, j + 1], rtol=1e-6, atol=1e-6)
    # independent Euler: x_{j+1} = x_j + (t_{j+1} - t_j) v
    v0 = predict_velocity(pipe.transformer, res.conditioning, res.states[:, 0], res.timesteps[0].expand(3))
    manual = res.states[:, 0] + (res.sigmas[1] - res.sigmas[0]) * v0
    torch.testing.assert_close(manual, res.states[:, 1], rtol=1e-5, atol=1e-5)


def test_noise_shape_checked(pipe):
    image, _ = _inputs(pipe)
    with pytest.raises(ValueError, match=r"noises must have shape \[G, N_img, C\] = \[G, 64, 16\]"):
        _run(pipe, image, torch.zeros(2, 10, 16))
