"""Methods that ship with the package (MoRAM). Baselines live in the top-level baselines/."""
