"""finetune-chat: talk to a finished run (base + adapter, or the full fine-tune), streaming tokens.

    finetune-chat run=outputs/<date>/<time>                           # interactive: one prompt per line
    finetune-chat run=... prompt="Write a haiku about the sea."       # one-shot, streamed to stdout
    finetune-chat run=... prompts_file=prompts.txt out=answers.jsonl  # batch: {"prompt", "response"} lines
    finetune-chat run=... quantization=nf4 temperature=0.7 top_p=0.9 seed=1  # (or load_in_4bit=true)

More: docs/modules.md, section ``finetune.cli.chat``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from finetune.config import CONF_DIR, QUANT_MODES
from finetune.data.formatting import prompt_ids
from finetune.errors import FinetuneError, say
from finetune.checks import as_bool, as_choice, as_number, parse_kv
from finetune.cli.common import run_cli
from finetune.export.common import open_run

log = logging.getLogger("finetune.cli.chat")

ARGS = {"run": None, "prompt": None, "prompts_file": None, "out": None, "max_new_tokens": "128",
        "temperature": "0", "top_p": "1.0", "quantization": None, "load_in_4bit": "false", "load_in_8bit": "false", "seed": "0", "trust_remote_code": "false"}
EXIT_WORDS = ("exit", "quit", "/exit", "/quit")


def quantization_node(mode: str | None, load_in_4bit: bool = False, load_in_8bit: bool = False):
    """The ``quantization`` node for the requested base precision (None: as the run trained).

    Args:
        mode: ``quantization=<mode>`` (any ``conf/quantization`` option), or None.
        load_in_4bit / load_in_8bit: the Hugging Face spellings of ``nf4`` / ``int8``.

    Returns:
        ``conf/quantization/<mode>.yaml`` loaded as a DictConfig, or None.

    Raises:
        FinetuneError: more than one is given, or an unknown mode.
    """
    chosen = [m for m, on in (("nf4", load_in_4bit), ("int8", load_in_8bit)) if on] + ([mode] if mode else [])
    if len(chosen) > 1:
        raise FinetuneError("quantization=, load_in_4bit=true and load_in_8bit=true are exclusive; choose one")
    if not chosen:
        return None
    return OmegaConf.load(CONF_DIR / "quantization" / f"{as_choice('quantization', chosen[0], QUANT_MODES)}.yaml")


@torch.no_grad()
def generate(model, tok, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, streamer=None, dcfg=None, bf16: bool = False) -> str:
    """Generate the assistant's reply to ``messages``.

    Args:
        model: a causal LM (PEFT or plain), in eval mode.
        tok: its tokenizer.
        messages: the conversation so far, ending with a user turn.
        max_new_tokens: at most this many new tokens.
        temperature: 0 = greedy decoding; > 0 = sampling at this temperature.
        top_p: nucleus sampling mass (sampling only).
        streamer: e.g. a ``transformers.TextStreamer``, fed the new tokens as they come.
        dcfg: the run's ``dataset`` node (chooses the chat or the plain template), optional.
        bf16: run under bf16 autocast (the run's precision).

    Returns:
        The decoded reply, special tokens removed.
    """
    from finetune.evaluation.scoring import autocast

    ids = torch.tensor([prompt_ids(tok, messages, dcfg)], device=next(model.parameters()).device)  # [1, prompt_len]
    sampling = temperature > 0
    kwargs = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p)) if sampling else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with autocast(model, bf16):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_new_tokens),
                             pad_token_id=tok.pad_token_id, streamer=streamer, **kwargs)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def classify_text(model, tok, text: str, cfg) -> dict:
    """The evaluator's prediction for one review.

    Args:
        model: the run's model.
        tok: its tokenizer.
        text: the review text.
        cfg: the run's config (``dataset``, ``trainer.max_length``, ``trainer.precision``, ``model.dtype``).

    Returns:
        ``{"label": word, "label_index": i, "probabilities": {word: p}}`` with ``p`` the softmax of the label
        words' log-likelihoods.
    """
    from finetune.evaluation.scoring import label_scores
    from finetune.model.load import resolve_precision

    dcfg = cfg.dataset
    bf16 = resolve_precision(cfg.trainer.precision, cfg.model.dtype).bf16
    scores = label_scores(model, tok, [{dcfg.text_field: text}], dcfg, int(cfg.trainer.max_length), 1, bf16)[0]
    probs = torch.softmax(scores, dim=0).tolist()
    words = [str(w) for w in dcfg.label_words]
    best = int(scores.argmax())
    return {"label": words[best], "label_index": best, "probabilities": dict(zip(words, probs))}


def read_prompts(path: Path) -> list[str]:
    """Prompts of a ``.txt`` (one per non-empty line) or ``.jsonl`` file (``{"prompt": ...}`` or strings).

    Raises:
        FinetuneError: missing file, another extension, a bad JSON line, or no prompts.
    """
    if not path.is_file():
        raise FinetuneError(f"prompts_file={path}: no such file")
    if path.suffix not in (".txt", ".jsonl"):
        raise FinetuneError(f"prompts_file={path}: use a .txt (one prompt per line) or .jsonl file")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            prompts.append(line.strip())
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FinetuneError(f"prompts_file={path}: line {n} is not JSON ({exc.msg})") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt.strip():
            raise FinetuneError(f"prompts_file={path}: line {n} has no \"prompt\" string")
        prompts.append(prompt)
    if not prompts:
        raise FinetuneError(f"prompts_file={path}: no prompts in it")
    return prompts


class Session:
    """A loaded run and the decoding settings; answers one prompt at a time (classification or generation)."""

    def __init__(self, run: str, opts: dict, quantization=None) -> None:
        from finetune.model.load import resolve_precision

        self.model, self.tok, self.cfg, self.path = open_run(run, quantization=quantization)
        self.opts = opts
        self.classification = self.cfg.dataset.task == "classification"
        self.bf16 = resolve_precision(self.cfg.trainer.precision, self.cfg.model.dtype).bf16

    def answer(self, prompt: str, history: list[dict] | None = None, stream: bool = False) -> dict:
        """Answer ``prompt`` (after ``history``); with ``stream`` the text goes to stdout as it is made.

        Returns:
            ``{"prompt", "response"}``, plus ``label`` / ``probabilities`` for classification.
        """
        from transformers import TextStreamer, set_seed

        if self.classification:
            pred = classify_text(self.model, self.tok, prompt, self.cfg)
            if stream:
                probs = ", ".join(f"{w} {p:.3f}" for w, p in pred["probabilities"].items())
                print(f"{pred['label']}  ({probs})", flush=True)
            return {"prompt": prompt, "response": pred["label"], "probabilities": pred["probabilities"]}
        set_seed(self.opts["seed"])
        messages = [*(history or []), {"role": "user", "content": prompt}]
        streamer = TextStreamer(self.tok, skip_prompt=True, skip_special_tokens=True) if stream else None
        text = generate(self.model, self.tok, messages, self.opts["max_new_tokens"], self.opts["temperature"],
                        self.opts["top_p"], streamer=streamer, dcfg=self.cfg.dataset, bf16=self.bf16)
        return {"prompt": prompt, "response": text}


def interactive(session: Session, stdin=None) -> None:
    """A REPL: one prompt per line until end of input or ``exit``; the conversation is kept (``/reset``)."""
    stdin = stdin or sys.stdin
    tty = stdin.isatty()
    kind = "review to classify" if session.classification else "message"
    if tty:
        print(f"[{session.path.name}] type a {kind}; '/reset' clears the conversation, 'exit' or Ctrl-D leaves")
    history: list[dict] = []
    while True:
        if tty:
            print(">>> ", end="", flush=True)
        line = stdin.readline()
        if not line:
            break
        prompt = line.strip()
        if not prompt:
            continue
        if prompt.lower() in EXIT_WORDS:
            break
        if prompt == "/reset":
            history.clear()
            continue
        result = session.answer(prompt, history, stream=True)
        if not session.classification:
            history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": result["response"]}]


def answers_file(path: Path) -> bool:
    """Whether ``path`` is an earlier finetune-chat answers file (its first line a {prompt, response} object)."""
    try:
        with path.open(encoding="utf-8") as fh:
            first = json.loads(fh.readline())
        return isinstance(first, dict) and {"prompt", "response"} <= set(first)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def batch(session: Session, prompts: list[str], out: Path) -> int:
    """Answer every prompt independently; writes one JSON line per prompt to ``out`` (through a temporary file
    renamed into place when complete); returns the count."""
    import os

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        n = _answer_all(session, prompts, tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def _answer_all(session: Session, prompts: list[str], out: Path) -> int:
    with out.open("w", encoding="utf-8") as fh:
        for i, prompt in enumerate(prompts, 1):
            fh.write(json.dumps(session.answer(prompt), ensure_ascii=False) + "\n")
            fh.flush()
            say(f"answered {i}/{len(prompts)}")
    return len(prompts)


def check_args(argv: list[str]) -> tuple[dict, dict, object]:
    """The arguments, typed and checked before any model loads: (arguments, generation options, quantization).

    Raises:
        FinetuneError: an unknown key, a bad value or a contradictory pair, in one line.
    """
    args, _ = parse_kv(argv, ARGS, ("run",), " (finetune-chat run=<run dir> [prompt=...])")
    opts = {
        "max_new_tokens": as_number("max_new_tokens", args["max_new_tokens"], int, 1),
        "temperature": as_number("temperature", args["temperature"], float, 0.0),
        "top_p": as_number("top_p", args["top_p"], float, 1e-6, 1.0),
        "seed": as_number("seed", args["seed"], int, 0),
    }
    quant = quantization_node(args["quantization"], as_bool("load_in_4bit", args["load_in_4bit"]),
                              as_bool("load_in_8bit", args["load_in_8bit"]))
    if args["prompt"] is not None and args["prompts_file"]:
        raise FinetuneError("give prompt= or prompts_file=, not both")
    if args["out"] and not args["prompts_file"]:
        raise FinetuneError("out= is for batch mode; give prompts_file= too")
    if args["prompt"] is not None and not args["prompt"].strip():
        raise FinetuneError("prompt= is empty")
    from finetune.model.load import allow_remote_code

    allow_remote_code(as_bool("trust_remote_code", args["trust_remote_code"]))
    return args, opts, quant


def _body(argv: list[str]) -> int:
    args, opts, quant = check_args(argv)
    prompts, out = None, None
    if args["prompts_file"]:
        file = Path(args["prompts_file"]).expanduser()
        prompts = read_prompts(file)
        out = Path(args["out"]).expanduser() if args["out"] else file.with_name(f"{file.stem}.answers.jsonl")
        if out.resolve() == file.resolve():
            raise FinetuneError(f"out={out} is the prompts file itself; give another path")
        from finetune.runs import check_out_path

        out = check_out_path(str(out), kind="file", command="finetune-chat", owned_file=answers_file)
    session = Session(args["run"], opts, quant)
    if prompts is not None:
        from finetune.platform.locks import out_lock

        with out_lock(out):  # two batches into one answers file never both write it
            n = batch(session, prompts, out)
        say(f"wrote {n} answers to {out}")
    elif args["prompt"] is not None:
        session.answer(args["prompt"], stream=True)
    else:
        interactive(session)
    return 0


def main(argv: list[str] | None = None) -> int:
    """finetune-chat entry point.

    Args:
        argv: ``key=value`` arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a user error (one ``error:`` line on stderr).
    """
    return run_cli(_body, argv, level=logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
