"""Build a tiny, meaningful family of local Llama checkpoints (base + fine-tunes) and check models.

The family is made for the README demo and the tests: a base model and N fine-tunes of it, each
trained on a different synthetic text domain. The good fine-tunes improve held-out perplexity;
the last one (``ft-N``) is a deliberately bad ingredient, trained on unrelated log lines with a
far too high learning rate, so a greedy soup picks a proper subset and beats the uniform average.
Everything is generated in-process (no downloads) and is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from merger import evaluate
from merger.errors import MergerError, ModelError

# All text comes from seeded templates rather than stdlib docstrings, which change between Python
# versions; random.Random's seeding (int or str), random(), randint(), choice() and sample() are
# stable across Python 3.10-3.12, so every machine builds the same corpus.
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_NUMS = ["two", "three", "four", "five", "six", "ten", "twelve", "fifteen", "twenty", "thirty"]
_TOWNS = ["Oakford", "Millbrook", "Riverside", "Eastgate", "Harbor City", "Kingsbridge", "Ashdown", "Fairhaven"]


def _weather(r: random.Random) -> str:
    c = r.choice(_TOWNS)
    s = [
        f"On {r.choice(_DAYS)} the sky over {c} was {r.choice(['cloudy', 'clear', 'grey', 'bright', 'stormy'])}, "
        f"with a {r.choice(['light', 'strong', 'cold', 'warm'])} wind from the "
        f"{r.choice(['north', 'south', 'east', 'west'])} and a high of {r.randint(2, 30)} degrees."
    ]
    s.append(
        f"{r.choice(['Rain', 'Snow', 'Fog', 'Sunshine', 'Thunder'])} is expected "
        f"{r.choice(['in the evening', 'by noon', 'overnight', 'in the morning'])}."
    )
    if r.random() < 0.6:
        s.append(
            f"By {r.choice(['midnight', 'dawn', 'the weekend'])} the temperature will fall to "
            f"{r.randint(-5, 15)} degrees."
        )
    if r.random() < 0.5:
        s.append(
            f"Farmers near {c} should expect {r.choice(['dry', 'wet', 'windy', 'sunny'])} "
            f"weather for the rest of the week."
        )
    return " ".join(s)


def _cooking(r: random.Random) -> str:
    veg = ["onions", "carrots", "potatoes", "leeks", "peppers", "mushrooms", "tomatoes", "beans"]
    a, b = r.sample(veg, 2)
    s = [
        f"To make the {r.choice(['soup', 'stew', 'curry', 'pie', 'sauce'])}, chop "
        f"{r.choice(_NUMS[:4])} {a} and {r.choice(_NUMS[:4])} {b}."
    ]
    s.append(
        f"Warm the {r.choice(['oil', 'butter'])} in a {r.choice(['large', 'small', 'heavy'])} "
        f"{r.choice(['pot', 'pan'])} and cook the {a} until {r.choice(['soft', 'golden', 'brown'])}."
    )
    s.append(f"Add the {r.choice(['stock', 'water', 'milk', 'wine'])} and simmer for {r.choice(_NUMS[4:])} minutes.")
    if r.random() < 0.7:
        s.append(
            f"Season with {r.choice(['salt', 'pepper', 'thyme', 'garlic', 'lemon'])} and serve "
            f"with {r.choice(['bread', 'rice', 'cheese', 'a green salad'])}."
        )
    return " ".join(s)


def _trains(r: random.Random) -> str:
    a, b, c, d = r.sample(_TOWNS, 4)
    s = [
        f"The {r.choice(['morning', 'evening', 'early', 'late'])} train from {a} to {b} leaves at "
        f"{r.randint(5, 11)} {r.choice(['oclock', 'fifteen', 'thirty', 'forty five'])} "
        f"and stops at {c} and {d}."
    ]
    s.append(f"Passengers for {r.choice(['the coast', 'the airport', 'the hills'])} should change at {c}.")
    if r.random() < 0.5:
        s.append(f"On {r.choice(_DAYS)} the {r.choice(['first', 'second', 'last'])} service is replaced by a bus.")
    if r.random() < 0.5:
        s.append("Tickets can be bought at the station or on board.")
    return " ".join(s)


def _garden(r: random.Random) -> str:
    crop = r.choice(["beans", "peas", "lettuce", "carrots", "tomatoes", "onions", "potatoes"])
    s = [
        f"In {r.choice(['spring', 'summer', 'autumn'])}, plant the {crop} in a "
        f"{r.choice(['sunny', 'shady', 'raised', 'wide'])} bed and water them every "
        f"{r.choice(['day', 'second day', 'evening', 'week'])}."
    ]
    s.append(
        f"Keep the {r.choice(['slugs', 'birds', 'rabbits', 'weeds'])} away with "
        f"{r.choice(['a net', 'straw', 'a low fence', 'ash'])}."
    )
    s.append(f"The {crop} will be ready to pick in {r.choice(_NUMS[:6])} weeks.")
    return " ".join(s)


def _logs(r: random.Random) -> str:
    # Unrelated to every held-out domain: the bad ingredient's training text.
    mods = ["kernel", "sshd", "nginx", "cron", "dbus", "systemd"]
    return " ".join(
        f"[{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}] "
        f"{r.choice(['ERROR', 'WARN', 'INFO', 'DEBUG'])} {r.choice(mods)}[{r.randint(100, 9999)}]: "
        f"{r.choice(['disk', 'socket', 'worker', 'queue', 'cache'])} "
        f"{r.choice(['timeout', 'reset', 'full', 'stalled', 'ok'])} code={r.randint(0, 255)};"
        for _ in range(3)
    )


def _general(r: random.Random) -> str:
    # Uses every word of the good domains but none of their sentence patterns: the base learns
    # the vocabulary, and each fine-tune still has a domain's patterns to learn.
    def w() -> str:  # digits too: the weather and train texts are full of them
        return str(r.randint(0, 30)) if r.random() < 0.1 else r.choice(_vocabulary())

    if r.random() < 0.5:  # loose word sequences keep the base from being sure of any pattern
        return " ".join(w() for _ in range(r.randint(4, 12))).capitalize() + r.choice(".,;")
    return r.choice(
        [
            f"The {w()} and the {w()} were {w()}.",
            f"We talked about {w()}, {w()} and {w()} on {r.choice(_DAYS)}.",
            f"There is a {w()} near the {w()} in {r.choice(_TOWNS)}.",
            f"Some people say {w()} {w()}, others say {w()} {w()}.",
            f"It was {w()}, {w()} and {w()}, like a {w()}.",
        ]
    )


@functools.cache
def _vocabulary() -> tuple[str, ...]:
    """The words of the good domains, from a fixed sample of their text."""
    r = random.Random(12345)
    text = " ".join(DOMAINS[d](r) for _ in range(50) for d in GOOD_DOMAINS)
    return tuple(sorted(set(re.findall(r"[A-Za-z]+", text))))


DOMAINS: dict[str, Callable[[random.Random], str]] = {
    "general": _general,
    "weather": _weather,
    "cooking": _cooking,
    "trains": _trains,
    "garden": _garden,
    "logs": _logs,
}
GOOD_DOMAINS = ("weather", "cooking", "trains", "garden")
BAD_DOMAIN = "logs"

SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
VOCAB_SIZE = 512
SEQ_LEN = 128  # training length; evaluation windows use the same length
EVAL_STRIDE = 64
DEFAULT_PROMPT = "On Monday the sky over Oakford was"

# Sizes chosen so the build takes ~25 s on 2 CPU cores yet the models differ clearly (see the test).
_ARCH = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256
)
_BATCH, _BASE_STEPS, _FT_STEPS = 16, 200, 40
# The bad ingredient's rate is 10x the good ones': it overshoots and wrecks what the base knew.
_BASE_LR, _FT_LR, _BAD_LR = 3e-3, 1e-3, 1e-2


def make_text(domains: Sequence[str], n_paragraphs: int, seed: int | str) -> str:
    """``n_paragraphs`` paragraphs drawn round-robin from ``domains``, one per line."""
    r = random.Random(seed)  # str seeds hash through sha512: stable across Python versions
    return "\n".join(DOMAINS[domains[i % len(domains)]](r) for i in range(n_paragraphs)) + "\n"


def _train_tokenizer(text: str):
    """A small BPE tokenizer (sentencepiece-style spaces) wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.normalizer = normalizers.Replace("\n", " ")  # paragraphs are one per line; no newline token
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL.values()), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    bos = SPECIAL["bos_token"]
    # Prepend BOS so every sequence, prompt or held-out text, starts from the same state.
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=_ARCH["max_position_embeddings"], **SPECIAL)


def _encode(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: long texts are split into windows later, so the length warning is noise.
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def _train(model, ids: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    """Plain AdamW on random windows of ``ids``; seeded generator keeps batches reproducible."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - SEQ_LEN - 1, (_BATCH,), generator=g)
        batch = torch.stack([ids[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def perplexity(model, tokenizer, text: str, max_length: int = SEQ_LEN, stride: int = EVAL_STRIDE) -> float:
    """Sliding-window perplexity of ``text``, as greedy soup's evaluator computes it (each token scored
    once, float32 logits). Runs in the model's own dtype; ``check`` casts to float32 first."""
    ids = _encode(tokenizer, text)
    if ids.numel() < 2:
        raise ValueError("text too short to compute a perplexity")
    return evaluate.perplexity(model, [ids], max_length, stride)


def _save(model, tokenizer, path: Path) -> Path:
    # Tiny shards so even this ~150k-parameter model is split, like real multi-shard checkpoints.
    # safe_serialization is the default (and a no-op kwarg) on transformers 5; needed on 4.x.
    model.save_pretrained(path, safe_serialization=True, max_shard_size="200KB")
    tokenizer.save_pretrained(path)
    return path


def build_demo(root: Path, *, n_finetunes: int = 4, seed: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """Build ``base``, ``ft-1..ft-N`` and the held-out text under ``root``; return their paths.

    ``ft-1..ft-(N-1)`` are good fine-tunes (one text domain each); ``ft-N`` is the bad ingredient.
    The dict has ``root``, ``base``, ``finetunes``, ``good``, ``bad`` (lists of dirs), ``domains``
    (dir name -> domain), ``heldout`` and ``heldout_jsonl``.
    """
    if n_finetunes < 2:
        raise ValueError("n_finetunes must be at least 2 (good fine-tunes plus one bad ingredient)")
    log = log or (lambda _msg: None)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    heldout = make_text(GOOD_DOMAINS, 80, f"{seed}:heldout")  # its own stream: never trained on
    (root / "heldout.txt").write_text(heldout, encoding="utf-8")
    with (root / "heldout.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": line}) + "\n" for line in heldout.splitlines())
    paths: dict = {"root": root, "heldout": root / "heldout.txt", "heldout_jsonl": root / "heldout.jsonl"}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: as fast for so small a model, and the same on every machine
    try:
        with torch.random.fork_rng(devices=[]):  # seed freely without disturbing the caller's RNG
            _build_models(paths, n_finetunes, seed, heldout, log)
    finally:
        torch.set_num_threads(threads)
    return paths


@evaluate.quiet_transformers()
def _build_models(paths: dict, n_finetunes: int, seed: int, heldout: str, log: Callable[[str], None]) -> None:
    """Train tokenizer, base and fine-tunes; save each and record it in ``paths``."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    root = paths["root"]
    general = make_text(["general"], 1500, f"{seed}:general")
    # The tokenizer sees every domain (as a real one would), the base only general text.
    tokenizer = _train_tokenizer(general + make_text([*GOOD_DOMAINS, BAD_DOMAIN], 250, f"{seed}:tokenizer"))
    log(f"tokenizer  BPE, {len(tokenizer)} tokens")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_ARCH,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    _train(model, _encode(tokenizer, general), _BASE_STEPS, _BASE_LR, seed)
    paths["base"] = _save(model, tokenizer, root / "base")
    log(f"base   general text          held-out perplexity {perplexity(model, tokenizer, heldout):10.2f}")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    paths["finetunes"], paths["good"], paths["bad"], paths["domains"] = [], [], [], {}
    for i in range(1, n_finetunes + 1):
        bad = i == n_finetunes
        domain = BAD_DOMAIN if bad else GOOD_DOMAINS[(i - 1) % len(GOOD_DOMAINS)]
        model.load_state_dict(base_state)
        text = make_text([domain], 150, f"{seed}:ft-{i}")
        _train(model, _encode(tokenizer, text), _FT_STEPS, _BAD_LR if bad else _FT_LR, seed + i)
        path = _save(model, tokenizer, root / f"ft-{i}")
        paths["finetunes"].append(path)
        paths["bad" if bad else "good"].append(path)
        paths["domains"][path.name] = domain
        what = f"{domain}, lr x10" if bad else domain
        log(f"{path.name:<6} {what:<21} held-out perplexity {perplexity(model, tokenizer, heldout):10.2f}")


@evaluate.quiet_transformers()
def check(model_dir: Path, heldout: Path | None = None, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 12) -> dict:
    """Load ``model_dir`` locally, report dtype, size, held-out perplexity and a greedy continuation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    report = {
        "model": str(model_dir),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    model = model.float().eval()  # evaluate in float32 whatever the stored dtype (bf16 merges too)
    if heldout is not None:
        report["perplexity"] = perplexity(model, tokenizer, Path(heldout).read_text(encoding="utf-8"))
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    report["prompt"] = prompt
    report["generated"] = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return report


def format_report(report: dict) -> str:
    """The check report as a few aligned lines."""
    lines = [
        f"model       {report['model']}",
        f"dtype       {report['dtype']}",
        f"parameters  {report['parameters']:,}",
    ]
    if "perplexity" in report:
        lines.append(f"perplexity  {report['perplexity']:.3f}")
    lines.append(f"generation  {report['prompt']!r} -> {report['generated']!r}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m merger.demo build DIR`` / ``python -m merger.demo check DIR``."""
    parser = argparse.ArgumentParser(prog="python -m merger.demo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the demo family (base, fine-tunes, held-out text)")
    b.add_argument("dir", type=Path)
    b.add_argument("--finetunes", type=int, default=4, help="number of fine-tunes (>= 2)")
    b.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="load a model directory and report perplexity and a sample")
    c.add_argument("dir", type=Path)
    c.add_argument("--heldout", type=Path, default=None, help="text file to compute perplexity on")
    c.add_argument("--prompt", default=DEFAULT_PROMPT)
    args = parser.parse_args(argv)

    try:
        if args.command == "build":
            t0 = time.perf_counter()
            log = functools.partial(print, flush=True)
            paths = build_demo(args.dir, n_finetunes=args.finetunes, seed=args.seed, log=log)
            print(
                f"built {1 + len(paths['finetunes'])} models in {args.dir} "
                f"({time.perf_counter() - t0:.1f} s); held-out text: {paths['heldout']}"
            )
        else:
            print(format_report(check(args.dir, args.heldout, args.prompt)))
    except (MergerError, ValueError, OSError) as e:
        parser.exit(1, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
