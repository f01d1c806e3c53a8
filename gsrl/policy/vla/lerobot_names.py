"""LeRobot / openpi / RLinf pi0.5 parameter names <-> this model's names, and a shape-checked loader.

Source of the external names (assumptions, not read from a real checkpoint header here): LeRobot 0.6.1
``modeling_pi05.py`` as listed in /work/shared/reference/pi05-and-flow-rl.md section 6.1, openpi's
``pi0_pytorch.py`` (the same names without LeRobot's leading ``model.``), and RLinf's extra heads:

    model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.*   -> vision_tower.*
    model.paligemma_with_expert.paligemma.model.multi_modal_projector.linear.* -> multi_modal_projector.*
    model.paligemma_with_expert.paligemma.model.language_model.*             -> language_model.*
    model.paligemma_with_expert.gemma_expert.model.*                          -> action_expert.*
    model.{action_in_proj,action_out_proj,time_mlp_in,time_mlp_out}.*         -> same
    value_head.mlp.{i}.*  (RLinf)                                             -> value_head.mlp.{i}.*
    noise_head.mlp_logvar.moduleList.{i}.linear_1.*  (RLinf)                  -> noise_head.mlp_logvar.{2i}.*

Also accepted: SigLIP saved by transformers 5 (no ``vision_model.`` level), and the pre-4.52 PaliGemma layout
(``paligemma.language_model.model.*``, ``paligemma.vision_tower.*``). Dropped on purpose: both ``lm_head``
weights (the LM's is tied to ``embed_tokens`` and is used for it when the embedding is missing, LeRobot's
fix for pi05_base; the expert's is an unused leftover), pi0's ``state_proj``, the expert's plain norm
``.weight`` keys (adaRMS replaces them), RLinf's ``noise_head.logvar_min/max`` buffers (rebuilt from the
config). pi0's ``action_time_mlp_*`` is renamed to ``time_mlp_*`` as LeRobot does (shapes then differ and are
reported). Keys are matched on the native side after the rules; anything else is reported by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

LEROBOT_PREFIX = "model."
_PG = "paligemma_with_expert.paligemma."
_EX = "paligemma_with_expert.gemma_expert."

# (external prefix, native prefix); the first rule of each native prefix is the canonical inverse.
_PREFIX_RULES: list[tuple[str, str]] = [
    (_PG + "model.vision_tower.vision_model.", "vision_tower."),
    (_PG + "model.vision_tower.", "vision_tower."),
    (_PG + "vision_tower.vision_model.", "vision_tower."),
    (_PG + "model.multi_modal_projector.linear.", "multi_modal_projector."),
    (_PG + "multi_modal_projector.linear.", "multi_modal_projector."),
    (_PG + "model.language_model.", "language_model."),
    (_PG + "language_model.model.", "language_model."),
    (_EX + "model.", "action_expert."),
    ("action_in_proj.", "action_in_proj."),
    ("action_out_proj.", "action_out_proj."),
    ("time_mlp_in.", "time_mlp_in."),
    ("time_mlp_out.", "time_mlp_out."),
    ("action_time_mlp_in.", "time_mlp_in."),
    ("action_time_mlp_out.", "time_mlp_out."),
    ("value_head.", "value_head."),
]
_RLINF_NOISE = re.compile(r"^noise_head\.mlp_logvar\.moduleList\.(\d+)\.linear_1\.(weight|bias)$")
_NATIVE_NOISE = re.compile(r"^noise_head\.mlp_logvar\.(\d+)\.(weight|bias)$")
_DROPPED = [
    re.compile(r"^paligemma_with_expert\.paligemma\.(model\.)?lm_head\.weight$"),
    re.compile(r"^paligemma_with_expert\.paligemma\.language_model\.lm_head\.weight$"),
    re.compile(r"^paligemma_with_expert\.gemma_expert\.lm_head\.weight$"),
    re.compile(r"^paligemma_with_expert\.gemma_expert\.model\.embed_tokens\.weight$"),
    re.compile(
        r"^paligemma_with_expert\.gemma_expert\.model\.(layers\.\d+\.(input|post_attention)_layernorm|norm)\.weight$"
    ),
    re.compile(r"^state_proj\.(weight|bias)$"),
    re.compile(r"^noise_head\.logvar_(min|max)$"),
]
_LM_HEAD = re.compile(r"^paligemma_with_expert\.paligemma\.(model\.|language_model\.)?lm_head\.weight$")
_EMBED = "language_model.embed_tokens.weight"


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model; lists every missing, unexpected and wrongly shaped key."""

    def __init__(
        self, missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    ) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [
            f"checkpoint does not match the model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} with a wrong shape)"
        ]
        lines += _listing("missing", missing)
        lines += _listing("unexpected", unexpected)
        lines += _listing(
            "wrong shape (checkpoint vs model)", [f"{k}: {list(got)} vs {list(want)}" for k, got, want in mismatched]
        )
        super().__init__("\n".join(lines))


def _listing(title: str, items: list[str], limit: int = 25) -> list[str]:
    if not items:
        return []
    shown = [f"  {title}:"] + [f"    {item}" for item in items[:limit]]
    if len(items) > limit:
        shown.append(f"    ... and {len(items) - limit} more")
    return shown


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing_allowed: list[str] = field(default_factory=list)  # native keys left at their initial values
    dropped: list[str] = field(default_factory=list)  # external keys deliberately not loaded


def is_lerobot_state_dict(state: Mapping[str, Tensor]) -> bool:
    """True for LeRobot/openpi/RLinf pi0.5 names (anything under ``paligemma_with_expert``)."""
    return any("paligemma_with_expert." in key for key in state)


def lerobot_to_native(name: str) -> str | None:
    """External name -> this model's name; None for keys dropped on purpose; the name unchanged if no rule applies."""
    key = name.removeprefix(LEROBOT_PREFIX)
    if any(p.match(key) for p in _DROPPED):
        return None
    match = _RLINF_NOISE.match(key)
    if match:
        return f"noise_head.mlp_logvar.{2 * int(match.group(1))}.{match.group(2)}"
    for external, native in _PREFIX_RULES:
        if key.startswith(external):
            return native + key[len(external) :]
    return key


def native_to_lerobot(name: str, prefix: str = LEROBOT_PREFIX) -> str:
    """This model's name -> LeRobot's (canonical rule; heads get RLinf's names), with ``prefix`` prepended."""
    match = _NATIVE_NOISE.match(name)
    if match:
        return f"{prefix}noise_head.mlp_logvar.moduleList.{int(match.group(1)) // 2}.linear_1.{match.group(2)}"
    for external, native in _PREFIX_RULES:
        if name.startswith(native):
            return prefix + external + name[len(native) :]
    raise KeyError(f"no LeRobot name for {name!r}")


def convert_lerobot_state_dict(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """(native state dict, dropped external keys). A tied LM head fills a missing ``embed_tokens``."""
    native: dict[str, Tensor] = {}
    dropped: list[str] = []
    lm_head: Tensor | None = None
    for key, tensor in state.items():
        if _LM_HEAD.match(key.removeprefix(LEROBOT_PREFIX)):
            lm_head = tensor
        target = lerobot_to_native(key)
        if target is None:
            dropped.append(key)
            continue
        if target in native:
            raise ValueError(f"two checkpoint keys map to {target!r} (second: {key!r})")
        native[target] = tensor
    if _EMBED not in native and lm_head is not None:
        native[_EMBED] = lm_head
    return native, dropped


def load_checked(
    module: nn.Module,
    state: Mapping[str, Tensor],
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> LoadReport:
    """Load ``state`` into ``module`` after checking names and shapes; raise ``CheckpointMismatchError`` listing all.

    Keys starting with an ``allow_missing`` prefix may be absent (they keep their initial values, e.g. a fresh
    value head); ``allow_unexpected`` prefixes are ignored when present.
    """
    expected = module.state_dict()
    missing_all = [k for k in expected if k not in state]
    missing = [k for k in missing_all if not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in expected and not k.startswith(allow_unexpected)]
    mismatched = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched)
    loadable = {k: v for k, v in state.items() if k in expected}
    module.load_state_dict(loadable, strict=False)
    return LoadReport(loaded=sorted(loadable), missing_allowed=[k for k in missing_all if k not in missing])


def load_lerobot_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], allow_missing: tuple[str, ...] = ("value_head.", "noise_head.")
) -> LoadReport:
    """Load a LeRobot/openpi/RLinf pi0.5 state dict into a ``VLAModel`` (heads absent from it stay initialised)."""
    native, dropped = convert_lerobot_state_dict(state)
    report = load_checked(model, native, allow_missing=allow_missing, allow_unexpected=("noise_head.",))
    report.dropped = dropped
    return report
