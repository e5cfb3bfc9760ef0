"""nanotune features: one module per flag-switched optimization, each with its config dataclass,
`validate(cfg)` and one `apply(model, cfg, run)` (train.py's docstring lists the order)."""
