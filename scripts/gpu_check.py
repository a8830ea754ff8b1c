"""The prepared GPU check: device placement, AMP, pinned memory, and the GPU benchmark, in one short run.

    python scripts/gpu_check.py                 # on a CUDA machine: writes docs/benchmarks/gpu.json
    python scripts/gpu_check.py --device cpu    # the same checks on the CPU (a dry run of the script itself)

It needs no Redis or broker: it drives the InferenceEngine directly with an in-memory parameter snapshot, so what it
measures is the engine's forward path (validation, stacking, pinned host memory, non-blocking copies,
inference_mode, autocast) against raw torch on the same device and batch size.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_workers.config import Settings  # noqa: E402
from agent_workers.models import make_spec, parameter_count  # noqa: E402
from agent_workers.worker.inference import InferenceEngine, LoadedModel  # noqa: E402

WORKLOADS = {
    "reference-mlp": dict(in_features=64, hidden=[256, 256], out_features=10),
    "heavy-mlp": dict(in_features=2048, hidden=[4096, 4096], out_features=1024),
}


def timed(fn, repeats: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", default="1,8,64,256")
    parser.add_argument("--out", default="docs/benchmarks/gpu.json")
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ", ".join(WORKLOADS)
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu for a dry run")
        return 2
    report: dict = {
        "device": args.device,
        "torch": torch.__version__,
        "host": platform.node(),
        "checks": {},
        "bench": [],
    }
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
    for amp in ("off", "bf16", "fp16") if args.device.startswith("cuda") else ("off",):
        settings = Settings.from_env({"AGENT_WORKERS_DEVICE": args.device, "AGENT_WORKERS_AMP": amp})
        engine = InferenceEngine(store=None, settings=settings)  # type: ignore[arg-type]
        for name, config in ((w, WORKLOADS[w]) for w in args.workloads.split(",")):
            spec = make_spec("mlp", **config)
            torch.manual_seed(0)
            module = spec.build().to(engine.device).eval()
            loaded = LoadedModel(name, 0, "e", spec, module, engine.device)
            # Placement: every parameter on the requested device.
            placed = all(p.device.type == engine.device.type for p in module.parameters())
            report["checks"][f"{name}/placement"] = placed
            x = np.random.default_rng(0).standard_normal((8, config["in_features"])).astype(np.float32)
            with torch.no_grad():
                reference = module.float()(torch.from_numpy(x).to(engine.device)).cpu().numpy()
            got = engine.forward(loaded, x)
            tol = 1e-4 if amp == "off" else 5e-2
            err = float(np.max(np.abs(got - reference)) / (np.max(np.abs(reference)) + 1e-9))
            report["checks"][f"{name}/amp={amp}/max-rel-err"] = err
            report["checks"][f"{name}/amp={amp}/ok"] = err < tol
            for n in [int(b) for b in args.batch_sizes.split(",")]:
                rows = [
                    np.random.default_rng(n).standard_normal(config["in_features"]).astype(np.float32).tolist()
                    for _ in range(n)
                ]
                xb = torch.from_numpy(np.array(rows, dtype=np.float32)).to(engine.device)
                repeats = 20 if "heavy" in name else 200

                def raw(module=module, xb=xb) -> None:  # noqa: ANN001 - bound now, called at once
                    with torch.inference_mode():
                        module(xb)

                def ours(engine=engine, loaded=loaded, rows=rows) -> None:  # noqa: ANN001
                    arrays = [engine.validate(loaded, r) for r in rows]
                    engine.run_batch(loaded, arrays)

                t_raw, t_ours = timed(raw, repeats), timed(ours, repeats)
                line = {
                    "workload": name,
                    "params": parameter_count(module),
                    "amp": amp,
                    "batch": n,
                    "raw_examples_per_s": n / t_raw,
                    "engine_examples_per_s": n / t_ours,
                    "engine_vs_raw": t_raw / t_ours,
                }
                report["bench"].append(line)
                print(
                    f"{name:14s} amp={amp:4s} batch={n:4d}  raw {n / t_raw:12,.0f}/s  engine {n / t_ours:12,.0f}/s"
                    f"  ({100 * t_raw / t_ours:5.1f}% of raw, includes JSON-list validation and host copies)"
                )
    failed = [k for k, v in report["checks"].items() if v is False]
    print("checks:", "all ok" if not failed else f"FAILED {failed}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
