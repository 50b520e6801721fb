"""The family-independent ACD recorder (`rcgrpo.editors.acd`): the family registry that makes
`rcgrpo.attach_acd` work for Flux and Qwen-Image transformers, the old import paths, and the marks that
keep true CFG's unconditional pass out of a capture."""
import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

import rcgrpo
from rcgrpo.editors import acd
from rcgrpo.editors.qwen_image_edit import QwenACDAttnProcessor
from rcgrpo.editors.flux_kontext import attention as flux_attention
from rcgrpo.testing import tiny_kontext_pipeline, tiny_qwen_edit_pipeline


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen_edit_pipeline(0).transformer


@pytest.fixture(scope="module")
def flux():
    return tiny_kontext_pipeline(0).transformer


def test_attach_acd_picks_the_family_from_the_transformer_class(qwen, flux):
    for transformer, family, processor, names in [
        (flux, "flux", flux_attention.FluxACDAttnProcessor,
         ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]),
        (qwen, "qwen-image", QwenACDAttnProcessor, ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]),
    ]:
        recorder = rcgrpo.attach_acd(transformer, last_k=2, backend="torch")
        try:
            assert recorder.family.name == family and recorder.layer_names == names
            assert all(type(p) is processor for p in recorder.processors)
            assert acd.get_acd_recorder(transformer) is recorder
            with pytest.raises(RuntimeError, match="already attached"):
                rcgrpo.attach_acd(transformer)
        finally:
            rcgrpo.detach_acd(transformer)
        assert acd.get_acd_recorder(transformer) is None
    with pytest.warns(UserWarning, match="only 2 attention modules"):
        recorder = acd.attach_acd(qwen)  # default last K = 10 of a 2-block model: all of them
    acd.detach_acd(qwen)
    assert recorder.layer_indices == [0, 1]


def test_old_import_paths_are_the_generic_recorder():
    assert rcgrpo.attach_acd is acd.attach_acd and rcgrpo.detach_acd is acd.detach_acd
    assert rcgrpo.ACDRecorder is acd.ACDRecorder
    assert rcgrpo.FluxACDAttnProcessor is flux_attention.FluxACDAttnProcessor


def test_unknown_transformers_and_custom_processors_are_refused(qwen):
    with pytest.raises(TypeError, match="no ACD processor for a Linear; supported transformer classes: "
                                        "FluxTransformer2DModel, QwenImageTransformer2DModel"):
        acd.attach_acd(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected an ACDFamily"):
        acd.register_acd_family("Linear", object())

    class Custom(QwenDoubleStreamAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                     attention_mask=None, image_rotary_emb=None):
            return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                    attention_mask, image_rotary_emb)

    attn = qwen.transformer_blocks[1].attn
    original = attn.processor
    attn.set_processor(Custom())
    try:
        with pytest.raises(TypeError, match="transformer_blocks.1.attn uses Custom; only the stock "
                                            "QwenDoubleStreamAttnProcessor2_0"):
            acd.attach_acd(qwen, last_k=1)
        assert acd.get_acd_recorder(qwen) is None
    finally:
        attn.set_processor(original)


def test_a_registered_family_serves_subclasses():
    class Stock:
        pass

    stock = Stock()

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.Module()
            self.attn.processor = stock
            self.attn.set_processor = lambda p: setattr(self.attn, "processor", p)

    class Processor:
        def __init__(self, recorder, index, *, backend, mode):
            self.recorder, self.index = recorder, index

    class Sub(Tiny):
        pass

    family = acd.ACDFamily(name="tiny", attention_modules=lambda t: [("attn", t.attn)], processor_class=Processor,
                           is_stock=lambda p: p is stock, stock_processor="Stock")
    acd.register_acd_family("Tiny", family)
    try:
        model = Sub()
        recorder = acd.attach_acd(model, last_k=1)
        assert recorder.family is family and isinstance(model.attn.processor, Processor)
        acd.detach_acd(model)
        assert model.attn.processor is stock
    finally:
        acd._FAMILIES.pop("Tiny")


def test_conditional_rows_keep_the_unconditional_pass_out(qwen):
    recorder = acd.attach_acd(qwen, last_k=2, backend="torch")
    try:
        block = qwen.transformer_blocks[0].attn
        gen = torch.Generator().manual_seed(0)
        hidden, text = torch.randn(2, 8 + 4, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
        mask = torch.ones(4)
        with torch.no_grad(), recorder.capture(mask) as cap:
            with recorder.conditional_rows(0):
                assert recorder.active_capture is None and recorder.rows == 0
                stock = QwenDoubleStreamAttnProcessor2_0()(block, hidden, text)
                out = block(hidden_states=hidden, encoder_hidden_states=text)
                assert all(torch.equal(a, b) for a, b in zip(out, stock))
                with recorder.conditional_rows(1):  # marks nest and restore
                    block(hidden_states=hidden, encoder_hidden_states=text)
                assert recorder.rows == 0
            assert recorder.rows is None and recorder.active_capture is cap
        # the unconditional call ran stock and was skipped; the rows=1 call recorded its first row only
        assert cap.skipped["unconditional"] == 1 and cap.num_calls == 1 and cap.mass.shape == (1, 1, 4)
        torch.testing.assert_close(cap.mass.sum(-1), torch.full((1, 1), 5.0))  # 5 text queries, weight 1 each
        with pytest.raises(ValueError, match="rows must be an int ≥ 0 or None"):
            with recorder.conditional_rows(-1):
                pass
        with torch.no_grad(), recorder.capture(mask) as cap:
            with pytest.raises(ValueError, match="3 conditional rows marked but attention layer 0 runs a batch of 2"):
                with recorder.conditional_rows(3):
                    block(hidden_states=hidden, encoder_hidden_states=text)
            block(hidden_states=hidden, encoder_hidden_states=text)  # no mark: every row
        assert cap.mass.shape == (1, 2, 4)
    finally:
        acd.detach_acd(qwen)
