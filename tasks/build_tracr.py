"""Compile the tracr programs and write the shipped models `circuits/builtin/tracr-<name>/`.

Needs the optional extra (`pip install -e ".[tracr]"`: tracr-pypi, jax). Deterministic: tracr
compiles to fixed weights. Each model's meta.json records the residual labels, tracr's own
outputs on reference inputs, and the ground-truth circuits for zero and for resample ablation
(see `circuits/model/tracr.py`), which `tests/test_tracr.py` checks without tracr installed.

    python tasks/build_tracr.py [reverse proportion sort]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from circuits.model import loader, tracr  # noqa: E402
from circuits.verify import groundtruth  # noqa: E402


def build(name: str, out_dir: Path) -> None:
    program = tracr.PROGRAMS[name]
    assembled, out_sop = tracr.compile_program(name)
    cfg, state, meta = tracr.convert(assembled, program, out_sop)
    meta["tracr"]["examples"] = tracr.reference_examples(assembled, program, out_sop)
    target = out_dir / f"tracr-{name}"
    tracr.save(target, cfg, state, meta)
    # The ground truth is measured with the engine on the saved model (see groundtruth.ground_truth).
    meta["tracr"]["ground_truth"] = groundtruth.ground_truth_record(loader.load(str(target)))
    tracr.save(target, cfg, state, meta)
    print(f"wrote {target}: {cfg['n_layers']} layers, {cfg['n_heads']} heads, d_model {cfg['d_model']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("programs", nargs="*", default=list(tracr.PROGRAMS))
    parser.add_argument("--out", type=Path, default=ROOT / "circuits" / "builtin")
    args = parser.parse_args()
    for name in args.programs:
        build(name, args.out)


if __name__ == "__main__":
    main()
