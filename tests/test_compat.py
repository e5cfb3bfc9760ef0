"""The compatibility matrix (core/compat.py) against the real start-up checks, for every pair of features.

For each pair of matrix rows, the flags of both (plus a flag each one needs) go through train.validate,
the check every run does before loading anything: a pair the matrix refuses must fail with the
matrix's reason, a pair it accepts must pass (so no module refuses what the matrix promises), and a
CUDA-only feature on this CPU machine must fail with its hardware reason.
"""

import dataclasses
import importlib.util
import itertools
import re
import typing

import pytest
import torch

import core.model
import train
from core import UserError, compat

CUDA = torch.cuda.is_available()
ROWS = compat.rows(train.Config())
BY_FLAG = {f.flag: f for f in ROWS}


def _parse_only(argv: list[str]) -> train.Config:
    import tyro

    return tyro.cli(train.Config, args=argv, config=train.CLI)


def _leaves(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, prefix + f.name + ".")
        else:
            yield prefix + f.name, value


DEFAULTS = dict(_leaves(train.Config()))


def _settings(row: compat.Feature) -> dict:
    """The config fields the row's example flags change (parsed once by the real CLI, no validation)."""
    return {k: v for k, v in _leaves(_parse_only(row.argv())) if DEFAULTS[k] != v}


SETTINGS = {f.flag: _settings(f) for f in ROWS}


def _config(flags: list[str]) -> train.Config:
    """A Config with exactly these rows on (their example flags set)."""
    cfg = train.Config()
    for flag in flags:
        for path, value in SETTINGS[flag].items():
            *parents, name = path.split(".")
            setattr(_resolve(cfg, parents), name, value)
    return cfg


def _pair(fa: str, fb: str, cuda: bool) -> tuple[list[str], str | None]:
    """The flags to try for a pair (with what they need) and the matrix's verdict, "--tp N" shown as typed."""
    on, reason = compat.complete([BY_FLAG[fa], BY_FLAG[fb]], cuda, ROWS)
    for f in ROWS:
        if reason and f.flag.endswith(" N"):
            reason = reason.replace(f.flag, f.example)
    return [f.flag for f in on], reason


def _resolve(cfg, parents):
    for p in parents:
        cfg = getattr(cfg, p)
    return cfg


def _missing_package(flags) -> str | None:
    """A package a row needs at validation and this machine lacks (then validate refuses for that)."""
    for flag in flags:
        for package in {"--wandb": ["wandb"], "--liger": ["liger_kernel"]}.get(flag.split()[0], []):
            if importlib.util.find_spec(package) is None:
                return package
    return None


PAIRS = [(a.flag, b.flag) for a, b in itertools.combinations(ROWS, 2) if a.field != b.field]


def test_every_row_is_on_with_its_example_flags():
    for f in ROWS:
        assert SETTINGS[f.flag], f"{f.flag}: its example {f.argv()} changes no config field"
        assert f.field in SETTINGS[f.flag] and f.is_on(SETTINGS[f.flag][f.field]), f.flag


def test_every_pair_is_accepted_or_refused_as_the_matrix_says():
    wrong = []
    for fa, fb in PAIRS:
        flags, expected = _pair(fa, fb, CUDA)
        try:
            train.validate(_config(flags))
            got = None
        except UserError as e:
            got = str(e)
        if _missing_package(flags) and expected is None:
            continue  # refused here for the missing package (tested in the feature's own tests)
        if (expected is None) != (got is None) or (expected is not None and expected not in got):
            wrong.append(f"{fa} + {fb}: matrix says {expected!r}, train.validate says {got!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("device_has_cuda", [False, True])
def test_check_alone_refuses_exactly_the_matrix_pairs(device_has_cuda):
    """The same pairs through compat.check with and without a GPU (the CUDA case is not reachable here)."""
    for fa, fb in PAIRS:
        flags, expected = _pair(fa, fb, device_has_cuda)
        a, b = BY_FLAG[fa], BY_FLAG[fb]
        hardware = next((f for f in (a, b) if f.cuda and not device_has_cuda), None)
        direct = hardware.cuda_refusal() if hardware else compat.refusal(a, b)
        assert direct is None or direct in expected, (fa, fb, expected)  # the pair's own reason comes first
        try:
            compat.check(_config(flags), cuda=device_has_cuda)
            got = None
        except UserError as e:
            got = str(e)
        assert (expected is None) == (got is None) and (got is None or expected in got), (fa, fb, got)


def test_refused_pairs_name_both_flags_and_the_fix():
    pairs = compat.refused_pairs(train.Config())
    assert pairs, "the matrix refuses nothing?"
    for a, b, reason in pairs:
        cfg = _config([a.flag, b.flag])
        with pytest.raises(UserError) as e:  # (already refused as a pair, before any need is looked at)
            compat.check(cfg, cuda=True)
        shown = [f.example if f.flag.endswith(" N") else f.flag for f in (a, b)]  # "--tp N" -> "--tp 2"
        assert str(e.value) == f"{shown[0]} with {shown[1]}: {reason}"
        assert re.search(r"\b(use|pass|drop|add|train with)\b", reason), f"{a.flag} + {b.flag}: no fix in {reason!r}"


def test_needs_are_refused_alone_with_their_reason():
    for f in ROWS:
        needs = [n for n in f.needs if n in BY_FLAG]
        if not needs:
            continue
        cfg = train.Config()
        for path, value in SETTINGS[f.flag].items():
            *parents, name = path.split(".")
            setattr(_resolve(cfg, parents), name, value)
        shown = f.example if f.flag.endswith(" N") else f.flag
        with pytest.raises(UserError, match=re.escape(f"{shown} needs {' or '.join(needs)}")):
            compat.check(cfg, cuda=True)


def test_refusals_and_needs_name_existing_rows():
    flags = {f.flag for f in compat.FEATURES}
    for f in compat.FEATURES:
        assert {other for other, _ in f.refuses} <= flags and set(f.needs) <= flags, f.flag


def test_every_row_names_a_field_of_this_checkout():
    """A row whose section is missing counts as a feature removed from a fork; in this checkout every
    section is here, so a mistyped section would silently drop the row's refusals: none may be missing.
    A mistyped field inside a section raises."""
    cfg = train.Config()
    assert [f.flag for f in compat.FEATURES if not compat.field_value(cfg, f.field)[1]] == []
    assert compat.field_value(cfg, "no_such_section.lora") == (None, False)
    with pytest.raises(AttributeError, match="'lora.lroa' names no field of LoraConfig"):
        compat.field_value(cfg, "lora.lroa")


def test_every_feature_flag_has_a_row():
    """A new bool or choice flag must get a matrix row, or be listed as a plain setting in compat.SETTINGS."""
    hints = typing.get_type_hints
    missing = []
    for path in DEFAULTS:
        *parents, name = path.split(".")
        owner = type(_resolve(train.Config(), parents))
        kind = hints(owner, include_extras=False)[name]
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        if kind is not bool and choices is None or path in compat.SETTINGS:
            continue
        covering = [f for f in ROWS if f.field == path]
        values = [True] if kind is bool else [c for c in choices if c != DEFAULTS[path]]
        for v in values:
            if not any(f.is_on(v) for f in covering):
                missing.append(f"{path}={v!r}")
    assert not missing, f"flags with no row in core/compat.py FEATURES (nor in SETTINGS): {missing}"
    assert compat.SETTINGS <= set(DEFAULTS), f"SETTINGS names no field: {compat.SETTINGS - set(DEFAULTS)}"


def test_docs_table_is_current():
    readme = compat.DOC.read_text()
    begin, end = compat.DOC_BEGIN, compat.DOC_END
    assert begin in readme and end in readme, "docs/compatibility.md lost its compatibility-matrix markers"
    current = readme.split(begin)[1].split(end)[0]
    assert current == compat.markdown(train.Config()), \
        "docs/compatibility.md's table is stale: regenerate it with `python docs/compatibility.py`"


@pytest.mark.parametrize("argv, message", [
    (["--qlora", "--qat"], "error: --qat with --qlora: the base is already quantized"),
    (["--lora", "--lora-kernels", "--dora"], "error: --dora with --lora-kernels: --lora-kernels computes plain LoRA"),
    (["--attn", "flash", "--device", "cpu"], "error: --attn flash needs a CUDA GPU: FlashAttention kernels run"),
])
def test_refusal_is_one_line_before_anything_loads(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(core.model, "load_tokenizer", lambda *a: pytest.fail("loaded the tokenizer before refusing"))
    assert train.main(["--output-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
