"""The CLI surface: flags are flat, unique, documented, and match the reviewed tests/cli_flags.txt.

After changing a flag on purpose, regenerate the list with `python tests/test_cli.py` and review the diff.
"""

import dataclasses
import sys
import warnings
from pathlib import Path

FLAGS_FILE = Path(__file__).with_name("cli_flags.txt")
sys.path.insert(0, str(FLAGS_FILE.parent.parent))


def _parser():
    import tyro

    import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return tyro.extras.get_parser(train.Config, config=train.CLI)


def _actions():
    return [a for a in _parser()._actions if a.option_strings and a.dest != "help"]


def _leaf_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _leaf_fields(type(default), prefix + f.name + ".")
        else:
            yield prefix + f.name, f, default


def current_flags() -> str:
    return "".join(f"{a.option_strings[0]}\t{a.dest}\n" for a in _actions())


def test_flags_match_the_reviewed_list():
    assert FLAGS_FILE.read_text() == current_flags(), \
        "the CLI changed: run `python tests/test_cli.py` to regenerate tests/cli_flags.txt and review the diff"


def test_every_config_field_has_its_own_flag():
    import train

    fields = [name for name, _, _ in _leaf_fields(train.Config) if name != "auto"]  # auto: a record, not a flag
    flags = [a.option_strings[0] for a in _actions()]
    assert len(flags) == len(set(flags)) == len(fields)


def test_every_flag_is_documented_and_bools_default_false():
    import train

    for name, f, default in _leaf_fields(train.Config):
        if f.type is bool or f.type == "bool":
            assert default is False, f"{name}: bool flags default to False (W&B sweeps pass only true ones)"
    for a in _actions():
        assert a.help and a.help.strip() and not a.help.strip().startswith("(default"), a.option_strings


def test_documented_flags_parse():
    import train

    cfg = train.parse_config(["--model", "tiny-qwen2", "--seq-len", "128", "--lr", "1e-4", "--grad-accum", "2",
                              "--train-on-inputs", "--resume", "auto", "--output-dir", "x"])
    assert (cfg.model.path, cfg.data.seq_len, cfg.optim.lr, cfg.train.grad_accum) == ("tiny-qwen2", 128, 1e-4, 2)
    assert cfg.data.train_on_inputs and cfg.train.resume == "auto"


if __name__ == "__main__":
    FLAGS_FILE.write_text(current_flags())
    print(f"wrote {FLAGS_FILE}")
