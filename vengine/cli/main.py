"""`vengine` command line: chat and generate. Bad input -> one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vengine import __version__
from vengine.cli.options import (
    MODEL_HELP,
    add_model_args,
    add_threads_arg,
    apply_threads,
    engine_options,
    load_llm,
    resolve_model_flag,
    sampling_flags,
    start_pool,
)
from vengine.cli.pull import add_pull_parser, cmd_pull
from vengine.cli.serve import add_serve_parser, cmd_serve
from vengine.errors import ConfigError, VengineError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"vengine: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vengine", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vengine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    chat = sub.add_parser("chat", help="talk to a model (reads one turn per line when piped)")
    add_model_args(chat)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--json", action="store_true",
                      help="piped: one JSON object per turn ({\"reply\", \"finish_reason\"} or "
                           "{\"error\"}) instead of one reply per line with \\n escaped")
    gen = sub.add_parser("generate", help="complete one prompt, or a jsonl file of them")
    add_model_args(gen)
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt text")
    what.add_argument("--input", type=Path, help="jsonl: {\"id\", \"prompt\" or \"messages\"} rows")
    gen.add_argument("--output", type=Path, help="jsonl to append finished rows to (with --input)")
    gen.add_argument("--batch-size", type=int, default=16, help="most requests decoded at once")
    gen.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                     help="skip ids already in --output (default); --no-resume starts it afresh")
    gen.add_argument("--workers", type=int, help="with --input: engines on Ray, one GPU each "
                     "(or a share of the CPUs); needs pip install vengine[distributed]")
    gen.add_argument("--ray-address", help="with --workers: a running Ray cluster's head "
                     "(host:port, or auto); default: a local cluster for this run")
    info = sub.add_parser("info", help="device, memory budgets, model and kernel backend")
    info.add_argument("--model", help=MODEL_HELP)
    info.add_argument("--device", default="auto")
    add_threads_arg(info)
    ev = sub.add_parser("eval", help="RULER-style accuracy of full, vAttention and baselines")
    ev.add_argument("--model", help=MODEL_HELP)
    ev.add_argument("--device", default="auto")
    add_threads_arg(ev)
    ev.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    ev.add_argument("--context", default="2k", help="haystack length in tokens")
    ev.add_argument("--cases", type=int, default=5, help="cases per task")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--epsilons", default="0.05,0.1,0.25")
    ev.add_argument("--delta", type=float, help="vAttention delta (default: each epsilon)")
    ev.add_argument("--guarantees", default="denominator",
                    help="comma-separated: denominator (the paper's) and/or output")
    ev.add_argument("--haystack", choices=("essay", "noise"), default="essay")
    ev.add_argument("--prompt", choices=("chat", "completion"), default="chat",
                    help="chat: through the model's chat template; completion: for base models, "
                         "the question then the answer begun (RULER's answer prefix)")
    ev.add_argument("--baselines", default="",
                    help="comma-separated epsilons at whose vAttention density the oracle top-k, "
                         "predictor top-k and uniform baselines run (default: none)")
    ev.add_argument("--predictors", default="codes",
                    help="vAttention top-k predictors, comma-separated: codes (the shipped key "
                         "codes) and/or oracle (exact scores, the paper's oracle top-k)")
    ev.add_argument("--top-k", type=float, default=0.02, help="vAttention top_k (fraction)")
    ev.add_argument("--pilot", type=int, default=256, help="vAttention pilot rows")
    ev.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    ev.add_argument("--kv-dtype", choices=("auto", "fp8"), default="auto",
                    help="the KV rows of every mode: the model dtype, or fp8 (e4m3)")
    ev.add_argument("--out", type=Path, default=Path("eval.json"))
    ev.add_argument("--plot-dir", type=Path, help="write PNG plots here (needs matplotlib)")
    bench = sub.add_parser("bench", help="run a benchmark script; options after the name are "
                           "its own (vengine bench decode --help)")
    bench.add_argument("name", nargs="?", default="decode",
                       choices=("decode", "decode_gpu", "long_generation", "attention_error",
                                "generate_scale"))
    add_threads_arg(bench)
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the script's own options")
    add_pull_parser(sub)
    add_serve_parser(sub)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    if args.input is not None:
        from vengine.cli.batch import prepare_batch, run_batch

        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        sampling = sampling_flags(args, max_new_tokens=32768)
        options = engine_options(args, max_batch=args.batch_size)
        pool = pool_config(args)
        resolve_model_flag(args.model)
        requests, out = prepare_batch(args.input, args.output, args.resume, sampling)
        try:
            if args.resume and all(r["id"] in out.ids for r in requests):
                print(f"nothing to do: {len(requests)} already done in {args.output} "
                      "(--no-resume starts it afresh)", file=sys.stderr)
                return 0
            if pool is None:
                return run_batch(load_llm(options), args.input, out, args.resume, requests)
            with start_pool(pool, options) as engine:
                code = run_batch(engine, args.input, out, args.resume, requests)
            for dead in engine.dead:
                print(f"vengine: warning: worker pid {dead.pid} died mid-run; its unfinished "
                      "requests ran on the others", file=sys.stderr)
            return code
        finally:
            out.close()
    if args.output is not None:
        raise ConfigError("--output goes with --input (a jsonl file of prompts); "
                          "--prompt prints to stdout")
    if args.workers is not None or args.ray_address is not None:
        flag = "--workers" if args.workers is not None else "--ray-address"
        raise ConfigError(f"{flag} goes with --input (a jsonl file of prompts)")
    sampling = sampling_flags(args)
    options = engine_options(args, max_batch=1)
    resolve_model_flag(args.model)
    llm = load_llm(options)
    for piece in llm.stream(args.prompt, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def pool_config(args: argparse.Namespace):
    """--workers and --ray-address checked, and Ray importable, before anything else runs;
    None: no --workers, one engine in this process (Ray never imported)."""
    if args.workers is None:
        if args.ray_address is not None:
            raise ConfigError("--ray-address goes with --workers")
        return None
    from vengine.cli.options import as_flag_error
    from vengine.distributed.cluster import import_ray
    from vengine.distributed.config import PoolConfig

    try:
        config = PoolConfig(workers=args.workers, ray_address=args.ray_address)
        import_ray()
    except ConfigError as e:
        raise as_flag_error(e) from None
    return config


def cmd_chat(args: argparse.Namespace) -> int:
    from vengine.cli.chat import run_chat

    sampling = sampling_flags(args)
    options = engine_options(args, max_batch=1)
    resolve_model_flag(args.model)
    return run_chat(load_llm(options), args.system, sampling, args.json)


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from vengine.cli.options import as_flag_error
    from vengine.engine.config import resolve_device
    from vengine.engine.memory import available_memory
    from vengine.kernels import get_kernels
    from vengine.models.loader import load_model, resolve_model

    try:
        device = resolve_device(args.device)
    except ConfigError as e:
        raise as_flag_error(e) from None
    source = resolve_model(args.model)
    threads = apply_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok = load_model(source, device, dtype)
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    rows = [
        ("device", f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})"),
        ("torch", f"{torch.__version__}, {threads} threads"),
        ("model", f"{source.path} ({source.kind})"),
        ("architecture", f"{c.arch}: {c.num_layers} layers, {c.num_heads} heads / {c.num_kv_heads} KV, "
                         f"head dim {c.head_dim}, hidden {c.hidden_size}, vocab {c.vocab_size}"),
        ("layers", c.layer_kinds()),
        ("parameters", f"{params / 1e6:.1f} M"),
        ("context (trained)", str(c.max_position_embeddings)),
        ("KV per token", kv_per_token(c, dtype)),
        ("sparse kernels", get_kernels(device, dtype).__name__),
        ("host memory available", f"{available_memory(torch.device('cpu')) / 2**30:.1f} GiB"),
    ]
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        rows.append(("GPU memory", f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def kv_per_token(c, dtype) -> str:
    """Per layer kind: the global layers' KV per token (the pool's), and the sliding-window
    layers' per token of their window, with the ring each sequence keeps on the device."""
    from vengine.attention.window import WindowAttention

    text = f"{c.kv_bytes_per_token(dtype.itemsize) / 1024:.1f} KiB in {dtype}"
    windowed = c.num_layers - len(c.global_layers)
    if not windowed:
        return text
    row = 2 * windowed * c.num_kv_heads * c.head_dim * dtype.itemsize
    ring = WindowAttention.ring_bytes(windowed, max(c.layer_windows), c.num_kv_heads,
                                      c.head_dim, dtype.itemsize)
    ring_text = f"{ring / 2**20:.1f} MiB" if ring >= 2**20 else f"{ring / 1024:.1f} KiB"
    pooled = (f"{text} in the {len(c.global_layers)} global layers (host pool)"
              if c.global_layers else f"none pooled (every layer keeps a window; {dtype})")
    return (f"{pooled}; the {windowed} sliding-window layers {row / 1024:.1f} KiB per token of "
            f"the window, a {ring_text} ring per sequence on the device")


def cmd_eval(args: argparse.Namespace) -> int:
    from vengine import LLM
    from vengine.engine.config import parse_context
    from vengine.eval.run import EvalSettings, plot, print_table, provenance, run_eval, save
    from vengine.eval.tasks import TASKS

    tasks = tuple(TASKS) if args.tasks == "all" else tuple(args.tasks.split(","))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"--tasks: unknown task '{unknown[0]}' (known: {', '.join(TASKS)})")
    try:
        epsilons = tuple(float(e) for e in args.epsilons.split(","))
    except ValueError:
        raise ConfigError(f"--epsilons: expected numbers like 0.05,0.1, got '{args.epsilons}'") from None
    if args.cases < 1:
        raise ConfigError(f"--cases must be >= 1, got {args.cases}")
    predictors = tuple(args.predictors.split(","))
    if not predictors or any(p not in ("codes", "oracle") for p in predictors):
        raise ConfigError(f"--predictors: expected codes and/or oracle, got '{args.predictors}'")
    guarantees = tuple(args.guarantees.split(","))
    if any(g not in ("denominator", "output") for g in guarantees):
        raise ConfigError("--guarantees: expected denominator and/or output, got "
                          f"'{args.guarantees}'")
    try:
        baselines = tuple(float(e) for e in args.baselines.split(",") if e)
    except ValueError:
        raise ConfigError(f"--baselines: expected epsilons like 0.1, got '{args.baselines}'") from None
    if any(e not in epsilons for e in baselines):
        raise ConfigError(f"--baselines: {args.baselines} must be among --epsilons {args.epsilons}")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}")
    context = parse_context(args.context, "--context")
    settings = EvalSettings(tasks=tasks, context=context, cases=args.cases, seed=args.seed,
                            epsilons=epsilons, delta=args.delta, guarantees=guarantees,
                            haystack=args.haystack, baselines=baselines, predictors=predictors,
                            top_k=args.top_k, pilot=args.pilot, prompt=args.prompt)
    for eps in epsilons:  # bad values fail before the model loads
        from vengine.eval.run import vattention_settings

        vattention_settings(settings, eps)
    resolve_model_flag(args.model)
    apply_threads(args.threads)
    llm = LLM(model=args.model, device=args.device, max_context=context + 512,
              max_batch=args.max_batch, threads=args.threads, kv_dtype=args.kv_dtype)
    results = provenance(llm, args.argv) | run_eval(llm, settings)
    print_table(results)
    save(results, args.out)
    if args.plot_dir:
        for png in plot(results, args.plot_dir, Path(args.out).stem):
            print(f"wrote {png}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the script in this process, so that Ctrl-C ends it as it ends any command (exit 130,
    no traceback); its options are its own."""
    import runpy

    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        raise ConfigError(f"bench: {script} not found (benchmarks ship with the source tree)")
    apply_threads(args.threads)
    argv, path = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [f"vengine bench {args.name}", *args.options], [str(script.parent)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # the script's own exit, or its argparse's
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = argv, path
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what a result file records
        commands = {"chat": cmd_chat, "generate": cmd_generate, "info": cmd_info,
                    "eval": cmd_eval, "bench": cmd_bench, "pull": cmd_pull, "serve": cmd_serve}
        return commands[args.command](args)
    except VengineError as e:
        if isinstance(e, ConfigError):  # raised past the flag checks (e.g. the memory plan)
            from vengine.cli.options import as_flag_error

            e = as_flag_error(e)
        print(f"vengine: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vengine ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
