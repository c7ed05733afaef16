"""Checks every supported family must pass; each tests/families/test_<family>.py runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from zeda_core import FAMILIES, ZeroExpertMoeBlock, inject_zero_experts, load_model, record_routing, route, save_model
from zeda_core.convert import sparse_blocks

RELOAD_SCRIPT = """
import sys, torch
from zeda_core import load_model
model = load_model(sys.argv[1])
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of the family, with a non-trivial selection bias where it has one."""
    family = FAMILIES[model_type]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family.tiny_config()).eval()
    with torch.no_grad():
        for _, _, block in sparse_blocks(model, family):
            block.gate.weight.normal_(0.0, 0.5)
            if family.score_func == "sigmoid":
                block.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return model


def token_batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


class FamilyChecks:
    """Mixin: set ``model_type`` in the subclass."""

    model_type: str

    @property
    def family(self):
        return FAMILIES[self.model_type]

    def test_z0_route_equals_hf_router(self) -> None:
        model = tiny_model(self.model_type)
        _, _, block = sparse_blocks(model, self.family)[0]
        spec = self.family.routing_spec(model.config, 0)
        hidden = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
        _, hf_weights, hf_ids = block.gate(hidden)
        bias = block.gate.e_score_correction_bias if spec.selection_bias else None
        ours = route(F.linear(hidden, block.gate.weight), spec, selection_bias=bias)
        assert torch.equal(ours.topk_ids, hf_ids)
        torch.testing.assert_close(ours.topk_weights, hf_weights.float(), rtol=0, atol=1e-6)
        assert not ours.zero_mask.any()

    def test_z0_block_reproduces_model(self) -> None:
        model, tokens = tiny_model(self.model_type), token_batch()
        with torch.no_grad():
            expected = model(tokens).logits
            inject_zero_experts(model, 0)
            got = model(tokens).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    def test_preserve_keeps_logits_and_never_picks_zero(self) -> None:
        model, tokens = tiny_model(self.model_type), token_batch()
        with torch.no_grad():
            expected = model(tokens).logits
            spec = inject_zero_experts(model, 4, init="preserve")
            with record_routing() as recorder:
                got = model(tokens).logits
        assert spec.num_rows == spec.num_experts + 4
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert recorder.slot_counts()[..., 1].sum() == 0

    def test_gaussian_changes_logits_and_picks_zero(self) -> None:
        model, tokens = tiny_model(self.model_type), token_batch()
        with torch.no_grad():
            expected = model(tokens).logits
            inject_zero_experts(model, 4, init="gaussian", seed=3)
            with record_routing() as recorder:
                got = model(tokens).logits
        assert (got - expected).abs().max() > 1e-4
        assert recorder.slot_counts()[..., 1].sum() > 0
        assert model.config.zce_nums == [4] and model.config.zce_types == ["zero"]

    def test_save_reload_in_subprocess_is_bit_identical(self, tmp_path: Path) -> None:
        model, tokens = tiny_model(self.model_type), token_batch()
        inject_zero_experts(model, 4, init="gaussian", seed=3)
        with torch.no_grad():
            expected = model(tokens).logits
        save_model(model, tmp_path / "ckpt")
        torch.save(tokens, tmp_path / "tokens.pt")
        script = tmp_path / "reload.py"
        script.write_text(RELOAD_SCRIPT)
        subprocess.run(
            [sys.executable, script, tmp_path / "ckpt", tmp_path / "tokens.pt", tmp_path / "logits.pt"], check=True
        )
        assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
        reloaded = load_model(tmp_path / "ckpt")
        assert reloaded.config.zce_nums == [4]
        blocks = [m for m in reloaded.modules() if isinstance(m, ZeroExpertMoeBlock)]
        assert blocks and all(block.spec.num_zero_experts == 4 for block in blocks)


__all__ = ["FamilyChecks", "tiny_model", "token_batch"]
