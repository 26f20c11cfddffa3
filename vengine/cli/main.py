"""`vengine` command line: chat and generate. Bad input -> one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vengine.errors import VengineError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--ctx", default="8k", help="context length in tokens: 8192, 8k, 128K")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--attention", choices=("full", "vattention"), default="full")
    p.add_argument("--epsilon", type=float, default=0.05, help="vAttention relative error bound")
    p.add_argument("--delta", type=float, default=0.05, help="vAttention failure probability")
    p.add_argument("--host-mem", help="host KV budget, e.g. 64GiB")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vengine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    chat = sub.add_parser("chat", help="talk to a model (reads one turn per line when piped)")
    _add_model_args(chat)
    chat.add_argument("--system", help="system prompt")
    gen = sub.add_parser("generate", help="complete one prompt")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="the prompt text")
    return parser


def _load(args: argparse.Namespace):
    from vengine import LLM, VAttention

    attention: Any = "full"
    if args.attention == "vattention":
        attention = VAttention(epsilon=args.epsilon, delta=args.delta)
    options = {"host_mem": args.host_mem} if args.host_mem else {}
    return LLM(model=args.model, device=args.device, dtype=args.dtype, max_context=args.ctx,
               attention=attention, **options)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
            "repetition_penalty": args.repetition_penalty}


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _load(args)
    for piece in llm.stream(args.prompt, **_sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from vengine.cli.chat import run_chat

    sampling = _sampling(args)
    from vengine.engine.sampling import SamplingParams

    SamplingParams(**sampling)  # bad flags fail before the model loads
    return run_chat(_load(args), args.system, sampling)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"chat": cmd_chat, "generate": cmd_generate}[args.command](args)
    except VengineError as e:
        print(f"vengine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
