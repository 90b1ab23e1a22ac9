"""What MatMulNBits computes at accuracy level 4, made to happen in PyTorch: the kernel rounds its input to int8
per block of the weight's block size (scale = the block's largest magnitude / 127) before the integer dot
products. A Q4_1-like offset term is added by the fused graph from the unrounded input (per-block input sums
times the offsets), so it is exempt.

`Int8Inputs(model)` hooks every quantisable linear of `model`'s groups (`groups.linear_groups`; a tied table is
hooked at the logits projection, an untied embedding is a lookup and is not hooked); `set(group, q)` makes the
group's linears round their inputs as the file for BlockQuant `q` does (None: fp32 inputs, an unquantised group).
"""

from __future__ import annotations

from .groups import linear_groups


def round_int8_blocks(x, block: int):
    """x with its last axis rounded to int8 per block of `block` values (zero-padded), as MLAS quantises A."""
    import torch

    blocks = _blocked(x, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(scale == 0, 1, scale)).clamp(-127, 127)
    return (q * scale).flatten(-2)[..., :x.shape[-1]]


def _blocked(x, block: int):
    """[..., K] -> [..., K / block, block], K zero-padded to whole blocks."""
    import torch

    return torch.nn.functional.pad(x, (0, -x.shape[-1] % block)).unflatten(-1, (-1, block))


class Int8Inputs:
    def __init__(self, model):
        self.settings: dict[str, tuple] = {}  # group -> (block, per-member offsets [rows, blocks] or None)
        self.pending: dict[int, object] = {}   # id(module) -> offset correction of the call in flight
        self.hooks, self.modules = [], {}
        groups = linear_groups(model)
        for group, members in groups.items():
            if group == "embedding" and "lm_head" in groups:
                continue
            modules = [model.get_output_embeddings()] if group == "embedding" else [m for _, m in members]
            self.modules[group] = modules  # a tied table multiplies at the logits projection
            for index, module in enumerate(modules):
                self.hooks.append(module.register_forward_pre_hook(self._pre(group, index)))
                self.hooks.append(module.register_forward_hook(self._post))

    def set(self, group: str, q) -> None:
        """Round group's inputs as the file holding BlockQuant `q` does (None: leave them fp32)."""
        import torch

        if q is None or group not in self.modules:
            self.settings.pop(group, None)
            return
        offsets = None
        if q.offsets is not None:
            offsets = torch.from_numpy(q.offsets).split([m.weight.shape[0] for m in self.modules[group]])
        self.settings[group] = (q.block_size, offsets)

    def _pre(self, group: str, index: int):
        def hook(module, args):
            setting = self.settings.get(group)
            if setting is None:
                return None
            block, offsets = setting
            x = args[0]
            rounded = round_int8_blocks(x, block)
            if offsets is not None:  # the graph adds this term from the unrounded input
                self.pending[id(module)] = _blocked(x - rounded, block).sum(-1) @ offsets[index].T
            return (rounded, *args[1:])
        return hook

    def _post(self, module, args, output):
        correction = self.pending.pop(id(module), None)
        return output if correction is None else output + correction

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
