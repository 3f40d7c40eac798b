"""Long-context retrieval and perplexity of SmolLM2-135M (the packaged GGUF) with SEA and its same-budget rivals.

Three synthetic tasks, built from the packaged Wikipedia excerpt's held-out articles as filler:
- passkey: a 5-digit pass key stated once at a depth of 0..100% of the filler; asked for at the end;
- multikey: four "special magic number for <word>" sentences at random depths; asked for one of them;
- copy: a 64-token span of the filler repeated at the end: given its first 48 tokens again, continue with the
  next 16 (a lookup by content, what induction heads do).
A trial is correct when greedy decoding would produce the whole answer: every answer token is the argmax given the
prompt and the answer tokens before it (one forward of prompt + answer). With query blocks
(`--query-block-size` > 1) a SEA row reads a trial as `generate` would: the prompt in one forward, in blocks, then
the answer continuing its cache, every answer token choosing its own keys (`--per-query-tail N`: the prompt's last
N tokens as well). Prompt + answer of a (task, length) have exactly `length` tokens (so 8192 fits SmolLM2's
positions), and trials run in batches without padding.

Rows (each sparse row at every key budget, a share of the length): the dense teacher; SEA right after conversion
with its default selection (bins ranked by the keys' content, `sea_bin_ranking="key_summaries"`, whose best 4x
budget keys and the newest budget keys are candidates that each query re-ranks by its exact attention over them,
`sea_candidate_factor=4`) and with the paper's, bins ranked by SEA's estimate (`sea_bin_ranking="estimate"`, no
re-ranking), each right after conversion and distilled (`benchmarks/quality.py`'s recipe, which trains the
estimator and the output gates, its weights file); sink + local window and random bins + anchors (SEA's first and last bin); the oracle: the bins
holding the most of each layer's exact attention mass (`sea_baseline="oracle"`), the upper bound of any bin
selector at that budget, with and without the anchors; the content rankings alone, by each bin's mean key
(MoBA-style) and by Quest's per-channel bound of the bin's scores (`sea_bin_ranking="key_means"` /
`"key_bounds"`), the bounds with 4x or 2x candidates re-ranked, and the default selection without anchors (among
its candidates a re-ranked row ranks bins as the oracle does, so anchors and missed candidates are all that
differ). Every row but those re-ranked runs with `sea_candidate_factor=1`.
Perplexity on held-out text at the same lengths and budgets comes from the same run. `--diagnose` also reports, for
the passkey, which layers and heads put attention on the key and how SEA's estimate ranks the bin holding it.

    python benchmarks/retrieval.py --stage prepare            # tokenise (needs gensim and the GGUF's tokenizer)
    python benchmarks/retrieval.py --distilled outputs/quality-smollm2/sea-distilled.safetensors

Every (row, budget, task, length) cell is stored in --work-dir when measured and skipped when present, so a run
killed or cut at --time-limit continues where it stopped; the report (JSON, Markdown, PNG) is written from the
cells measured so far.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conversion.convert import convert_to_sea, load_dense  # noqa: E402
from quality import (  # noqa: E402
    HELD_OUT_SHARE,
    load_tokenizer,
    model_source,
    run_record,
    wikipedia_articles,
    with_trained_weights,
)
from quality import held_out_perplexity as perplexity  # noqa: E402
from sea.configuration_sea import SEA_BLOCK_RANKINGS, SeaConfigMixin  # noqa: E402
from sea.modeling_sea import CACHE_NAME  # noqa: E402
from sea.sea_attention import bin_edges, exact_attention, visible_key_counts  # noqa: E402
from sea.sea_layer import SeaAttention  # noqa: E402

TASKS = ("passkey", "multikey", "copy")
INSTRUCTION = ("There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about it.\n\n")
KEY_NAMES = ("apple", "river", "falcon", "lantern", "copper", "meadow", "violin", "glacier", "harbor", "tulip",
             "canyon", "saddle", "pepper", "walrus", "cobalt", "marble")
COPY_SPAN, COPY_GIVEN = 64, 48
# Row -> the SEA config fields it runs with (None: the dense teacher), over SEA's defaults. "distilled" rows load
# the distilled weights.
ROWS = {
    "dense": None,
    "sea (converted)": {},
    "sea (distilled)": {},
    "sea estimate (converted)": dict(sea_bin_ranking="estimate", sea_candidate_factor=1),
    "sea estimate (distilled)": dict(sea_bin_ranking="estimate", sea_candidate_factor=1),
    "sink + local window": dict(sea_baseline="local_window", sea_candidate_factor=1),
    "random + anchors": dict(sea_baseline="random_mask", sea_candidate_factor=1),
    "oracle (exact bin mass)": dict(sea_baseline="oracle", sea_anchor_bins=False, sea_candidate_factor=1),
    "oracle + anchors": dict(sea_baseline="oracle", sea_candidate_factor=1),
    "key means + anchors (MoBA-style)": dict(sea_bin_ranking="key_means", sea_candidate_factor=1),
    "key bounds + anchors (Quest-style)": dict(sea_bin_ranking="key_bounds", sea_candidate_factor=1),
    "key bounds, 4x candidates re-ranked exactly": dict(sea_bin_ranking="key_bounds", sea_candidate_factor=4),
    "key bounds, 2x candidates re-ranked exactly": dict(sea_bin_ranking="key_bounds", sea_candidate_factor=2),
    "sea (converted), no anchors": dict(sea_anchor_bins=False),
}
DISTILLED_ROWS = ("sea (distilled)", "sea estimate (distilled)")
# What a row's fields replace: every sparse row starts from SEA's defaults.
ROW_DEFAULTS = {name: getattr(SeaConfigMixin, name)
                for name in ("sea_bin_ranking", "sea_candidate_factor", "sea_anchor_bins", "sea_baseline")}


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="folder of the dense Llama (default: the packaged SmolLM2)")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file in --model ('' for safetensors)")
    parser.add_argument("--work-dir", default="outputs/retrieval-smollm2")
    parser.add_argument("--stage", choices=("prepare", "all", "report"), default="all",
                        help="prepare: build the trials only; report: write the report from the cells in --work-dir")
    parser.add_argument("--results", default="benchmarks/results/retrieval_smollm2", help="report path without suffix")
    parser.add_argument("--distilled", default=None, help="weights of the distilled estimator (quality.py's "
                        "sea-distilled.safetensors); without it the distilled rows are left out")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--budget-shares", type=int, nargs="+", default=[8, 16], help="key budget = length / share")
    parser.add_argument("--compressed-width", type=int, default=SeaConfigMixin.sea_compressed_width)
    parser.add_argument("--query-block-size", type=int, default=1, help="sea_query_block_size of every SEA row")
    parser.add_argument("--block-ranking", default="first_row", choices=SEA_BLOCK_RANKINGS,
                        help="sea_block_ranking of every SEA row (with query blocks)")
    parser.add_argument("--per-query-tail", type=int, default=0,
                        help="with query blocks, the prompt's last N tokens also choose their own keys, as the "
                             "answer's do (see `forward_logits`)")
    parser.add_argument("--group-selection", action="store_true", help="sea_group_selection of every SEA row")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--batch-tokens", type=int, default=32768, help="tokens per forward (trials per batch)")
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens scored per length and row")
    parser.add_argument("--diagnose", action="store_true", help="also locate the passkey's attention per layer/head")
    parser.add_argument("--diagnose-trials", type=int, default=10, help="passkey trials of the diagnosis")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; stop starting cells after this")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def tokens_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def answer_split(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the question and of the answer that follows it, tokenised together (so the answer's first
    token is the one the model would produce after the question)."""
    whole = tokens_of(tokenizer, question + answer)
    count = len(tokens_of(tokenizer, question))
    return whole[:count], whole[count:]


def insert_needles(filler: list[int], needles: list[list[int]], depths: list[float]) -> list[int]:
    """`filler` with each needle inserted at its depth (a share of the filler), in order of depth."""
    out, last = [], 0
    for depth, needle in sorted(zip(depths, needles), key=lambda pair: pair[0]):
        cut = round(depth * len(filler))
        out += filler[last:cut] + needle
        last = cut
    return out + filler[last:]


def build_trials(tokenizer, corpus: list[int], task: str, length: int, trials: int, seed: int) -> dict:
    """`trials` sequences of `length` tokens, prompt + answer, as one (trials, length) tensor (so the longest fits
    the model's positions), the prompt's length, and where the (asked) needle starts in each prompt. Deterministic
    in `seed`, task and length."""
    rng = random.Random(f"{seed}-{task}-{length}")
    head = tokens_of(tokenizer, INSTRUCTION)
    sequences, needle_starts = [], []
    for trial in range(trials):
        if task == "passkey":
            key = str(rng.randrange(10000, 100000))
            needles = [tokens_of(tokenizer, f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")]
            depths = [trial / max(trials - 1, 1)]
            question, answer = answer_split(tokenizer, "\n\nWhat is the pass key? The pass key is ", key)
        elif task == "multikey":
            names = rng.sample(KEY_NAMES, 4)  # the first is asked for; its needle's start is reported
            numbers = [str(rng.randrange(1000000, 10000000)) for _ in names]
            needles = [tokens_of(tokenizer, f"\nThe special magic number for {name} is: {number}.\n")
                       for name, number in zip(names, numbers)]
            depths = [rng.random() for _ in names]
            question, answer = answer_split(
                tokenizer, f"\n\nWhat is the special magic number for {names[0]}? The special magic number for "
                           f"{names[0]} is: ", numbers[0])
        else:  # copy
            needles, depths = [], []
            question, answer = [], []
        answer_tokens = COPY_SPAN - COPY_GIVEN if task == "copy" else len(answer)
        budget = length - answer_tokens - len(head) - len(question) - sum(map(len, needles))
        start = rng.randrange(0, len(corpus) - budget)
        filler = corpus[start : start + budget]
        if task == "copy":
            # A span from the middle 80% of the filler, repeated at the end: its first tokens given, the rest asked.
            filler = filler[:-COPY_GIVEN]
            if len(filler) < COPY_SPAN:
                raise ValueError(f"copy: a length of {length} leaves no room for a {COPY_SPAN}-token span")
            at = rng.randrange(len(filler) // 10, max(len(filler) // 10 + 1, len(filler) * 9 // 10 - COPY_SPAN))
            at = min(at, len(filler) - COPY_SPAN)  # short lengths: the span still whole
            span = filler[at : at + COPY_SPAN]
            question, answer = span[:COPY_GIVEN], span[COPY_GIVEN:]
            needle_starts.append(len(head) + at)
            prompt = head + filler + question
        else:
            body = insert_needles(filler, needles, depths)
            needle_starts.append(len(head) + round(depths[0] * len(filler)) + sum(
                len(n) for d, n in zip(depths[1:], needles[1:]) if d < depths[0]))
            prompt = head + body + question
        assert len(prompt + answer) == length, (task, len(prompt), len(answer), length)
        sequences.append(prompt + answer)
    prompt_length = length - answer_tokens
    return {"input_ids": torch.tensor(sequences, dtype=torch.int32), "prompt_length": prompt_length,
            "needle_starts": torch.tensor(needle_starts)}


def prepare(args, work: Path):
    """Token ids of the trials and of the held-out perplexity text, stored in `work` (for machines without the
    tokenizer's or the corpus's packages)."""
    path = work / "trials.pt"
    if path.exists():
        return torch.load(path)
    tokenizer = load_tokenizer(args)
    articles = wikipedia_articles()
    cut = int(len(articles) * (1 - HELD_OUT_SHARE))  # quality.py's held-out articles: never seen in distillation
    corpus = []
    for text in articles[cut:]:
        corpus += tokens_of(tokenizer, text) + [tokenizer.eos_token_id]
    data = {"held_out": torch.tensor(corpus, dtype=torch.int32), "trials": {}}
    for task in TASKS:
        for length in args.lengths:
            data["trials"][f"{task}-{length}"] = build_trials(tokenizer, corpus, task, length, args.trials, args.seed)
    torch.save(data, work / "trials.tmp")
    (work / "trials.tmp").replace(path)
    return data


def forward_logits(model, ids: torch.Tensor, per_query_rows: int) -> torch.Tensor:
    """Logits of `ids`: one forward, or with `per_query_rows` as `generate` reads a prompt under SEA's query blocks:
    every token but the last `per_query_rows` in one forward (in blocks), then those continuing its cache with
    `sea_query_block_size=1`, as every decoded token chooses its own keys (one forward of them equals decoding them
    one by one)."""
    if not per_query_rows:
        return model(ids, use_cache=False).logits
    cut = ids.shape[1] - per_query_rows
    head = model(ids[:, :cut], use_cache=True)
    block_size = model.config.sea_query_block_size
    model.config.sea_query_block_size = 1
    try:
        tail = model(ids[:, cut:], **{CACHE_NAME: head[CACHE_NAME]}, use_cache=False).logits
    finally:
        model.config.sea_query_block_size = block_size
    return torch.cat([head.logits, tail], dim=1)


@torch.no_grad()
def accuracy(model, trials: dict, batch_tokens: int, per_query_tail: int | None = None) -> dict:
    """Share of trials whose answer greedy decoding would produce, and the mean share of answer tokens right. With
    `per_query_tail` (SEA rows with query blocks), the answer and the prompt's last `per_query_tail` tokens are read
    per query, as `generate` does (`forward_logits`); else the whole trial in one forward."""
    ids, length = trials["input_ids"], trials["prompt_length"]
    per_query_rows = 0 if per_query_tail is None else ids.shape[1] - length + per_query_tail
    device = next(model.parameters()).device
    batch = max(1, batch_tokens // ids.shape[1])
    exact, token_share = [], []
    for b in range(0, len(ids), batch):
        chunk = ids[b : b + batch].to(device).long()
        logits = forward_logits(model, chunk, per_query_rows)[:, length - 1 : -1]
        right = logits.argmax(-1) == chunk[:, length:]
        exact.append(right.all(-1).cpu())
        token_share.append(right.float().mean(-1).cpu())
    return {"accuracy": float(torch.cat(exact).float().mean()), "answer_tokens_right": float(torch.cat(token_share).mean()),
            "trials": len(ids)}


NEEDLE_WINDOW = 24  # tokens from a needle's start that hold its sentence


@torch.no_grad()
def diagnose(model, trials: dict) -> list[dict]:
    """For passkey trials, per layer and head: the exact attention mass of the answer's first query on the needle
    sentence, and the rank (0 = first) SEA's estimate gives the bin holding the needle token that query attends to
    most. Run with the oracle's selection, so every layer's queries and keys stay those of (nearly) dense attention
    while the estimate is computed from them as usual. The prompt's last token is read as a cached decoding step,
    as `generate` would: a forward estimates every one of its rows only when it ranks them per query (not within
    the key budget, nor in query blocks)."""
    records = []

    def hook(module, args, output):
        records.append((module.width, output.queries[:, :, -1:], output.keys, output.key_valid,
                        output.estimate_log_probs[0, :, -1]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, SeaAttention)]
    ids, length = trials["input_ids"], trials["prompt_length"]
    device = next(model.parameters()).device
    masses, ranks = [], []
    try:
        for i in range(len(ids)):
            prompt = ids[i : i + 1, :length].to(device).long()
            head = model(prompt[:, :-1], use_cache=True)
            records.clear()
            model(prompt[:, -1:], **{CACHE_NAME: head[CACHE_NAME]}, use_cache=False)
            window = slice(int(trials["needle_starts"][i]), int(trials["needle_starts"][i]) + NEEDLE_WINDOW)
            trial_masses, trial_ranks = [], []
            for width, q, k, key_valid, estimate in records:
                counts = visible_key_counts(key_valid, True, key_valid[:, -1:])
                probs = exact_attention(q, k, key_valid, counts, True, q.shape[-1] ** -0.5, slice(0, 1))[0][0, :, 0]
                trial_masses.append(probs[:, window].sum(-1))
                edges = bin_edges(counts, width)[0, 0]  # no padding: rank = position
                top_token = window.start + probs[:, window].argmax(-1)
                needle_bin = torch.searchsorted(edges, top_token, right=True) - 1
                trial_ranks.append((estimate > estimate.gather(-1, needle_bin[:, None])).sum(-1))
            masses.append(torch.stack(trial_masses).float().cpu())
            ranks.append(torch.stack(trial_ranks).float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    masses, ranks = torch.stack(masses).mean(0), torch.stack(ranks).median(0).values  # (layers, heads)
    return [{"needle_mass_per_head": m.tolist(), "estimate_rank_per_head": r.tolist()} for m, r in zip(masses, ranks)]


def cell_path(work: Path, row: str, share: int | None, task: str, length: int) -> Path:
    slug = row.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
    return work / "cells" / f"{slug}-{share or 'all'}-{task}-{length}.json"


def measure_cell(path: Path, measure):
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    result = measure()
    result["seconds"] = round(time.time() - start, 1)
    path.with_suffix(".tmp").write_text(json.dumps(result))
    path.with_suffix(".tmp").replace(path)
    return result


def models_for_rows(args, teacher):
    """One SEA conversion per estimator (converted, distilled); rows differ only in config fields read per call."""
    converted = convert_to_sea(teacher, sea_compressed_width=args.compressed_width).eval()
    distilled = None
    if args.distilled:
        distilled = with_trained_weights(convert_to_sea(teacher, sea_compressed_width=args.compressed_width),
                                         Path(args.distilled)).eval()
    return converted, distilled


def report(args, cells: dict, diagnosis: dict, record: dict):
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    body = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct (packaged GGUF, Q4_1 dequantised)", "trials": args.trials,
            "lengths": args.lengths, "budget_shares": args.budget_shares, "compressed_width": args.compressed_width,
            "query_block_size": args.query_block_size, "block_ranking": args.block_ranking,
            "group_selection": args.group_selection, "per_query_tail": args.per_query_tail, "cells": cells,
            "diagnosis": diagnosis, **record}
    results.with_suffix(".json").write_text(json.dumps(body, indent=1))
    per_query_note = (f"; the answer and the prompt's last {args.per_query_tail} tokens per query, after the cache of "
                      "the rest" if args.query_block_size > 1 else "")
    lines = [f"# Retrieval and perplexity of SEA on {body['model']}", "", f"```\n{body['command']}\n```", "",
             f"Device: {body['device']}; {body['versions']}", "",
             f"{args.trials} trials per task and length; key budget = length / share, M = {args.compressed_width}, "
             f"query blocks of {args.query_block_size} ranked by {args.block_ranking}"
             f"{', one selection per key/value group' if args.group_selection else ''}"
             f"{per_query_note}.", ""]
    lengths = sorted(args.lengths)
    header = "| row | keys | " + " | ".join(f"{t} @ {n}" for t in TASKS for n in lengths) + " | " + \
             " | ".join(f"ppl @ {n}" for n in lengths) + " |"
    lines += [header, "|---" * (header.count("|") - 1) + "|"]
    for row in args.rows:
        for share in ([None] if ROWS[row] is None else args.budget_shares):
            key = f"{row}|{share}"
            if key not in cells:
                continue
            got = cells[key]
            acc = [f"{got[f'{t}-{n}']['accuracy']:.0%}" if f"{t}-{n}" in got else "-" for t in TASKS for n in lengths]
            ppl = [f"{got[f'ppl-{n}']['perplexity']:.2f}" if f"ppl-{n}" in got else "-" for n in lengths]
            lines.append(f"| {row} | {'all' if share is None else f'1/{share}'} | " + " | ".join(acc + ppl) + " |")
    for name, rows in diagnosis.items():
        lines += ["", f"Passkey diagnosis ({name}, at {max(args.lengths)} tokens, oracle selection): per layer, the "
                  "answer query's exact attention mass on the needle sentence (the head that puts the most there) and "
                  "the median rank the estimate gives, in that head, the bin holding the needle token it attends to most "
                  f"(0 = first of {args.compressed_width}; the budget holds about {args.compressed_width // args.budget_shares[0]} bins):", ""]
        for layer, row in enumerate(rows):
            mass = row["needle_mass_per_head"]
            head = max(range(len(mass)), key=mass.__getitem__)
            lines.append(f"- layer {layer}: mass {mass[head]:.2f} (head {head}), estimate rank "
                         f"{row['estimate_rank_per_head'][head]:.0f} of {args.compressed_width}")
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(cells, args, results.with_suffix(".png"))
    print("\n".join(lines))


def plot(cells: dict, args, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS) + 1, figsize=(5 * (len(TASKS) + 1), 4))
    for ax, task in zip(axes, (*TASKS, "ppl")):
        for index, (key, got) in enumerate(cells.items()):  # one colour per row in every panel
            row, share = key.split("|")
            metric = (lambda n: got.get(f"ppl-{n}", {}).get("perplexity")) if task == "ppl" else \
                (lambda n: got.get(f"{task}-{n}", {}).get("accuracy"))
            points = [(n, metric(n)) for n in sorted(args.lengths) if metric(n) is not None]
            if points:
                label = row if share == "None" else f"{row}, 1/{share}"
                ax.plot(*zip(*points), marker="o", label=label, color=f"C{index % 10}",
                        linestyle="-" if share in ("None", "8") else "--")
        ax.set_xscale("log", base=2)
        ax.set_title(task if task != "ppl" else "held-out perplexity")
        ax.set_xlabel("tokens")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DIAGNOSED = ("sea converted", "sea distilled")


def cell_plan(args):
    """(row, share or None for dense, task, length) of every cell, in measuring order: the first share and length
    given first."""
    for share in args.budget_shares:
        for length in args.lengths:
            for row in args.rows:
                if ROWS[row] is None and share != args.budget_shares[0]:
                    continue
                for task in (*args.tasks, "ppl"):
                    yield row, None if ROWS[row] is None else share, task, length


def diagnosis_path(work: Path, name: str, length: int) -> Path:
    return work / f"diagnosis-{name.replace(' ', '_')}-{length}.json"


def stored_results(args, work: Path) -> tuple[dict, dict]:
    """The cells and diagnoses measured so far in `work` (by this run or earlier ones)."""
    cells = {}
    for row, share, task, length in cell_plan(args):
        if (path := cell_path(work, row, share, task, length)).exists():
            cells.setdefault(f"{row}|{share}", {})[f"{task}-{length}"] = json.loads(path.read_text())
    diagnosis = {name: json.loads(path.read_text())["layers"] for name in DIAGNOSED
                 if (path := diagnosis_path(work, name, max(args.lengths))).exists()}
    return cells, diagnosis


def measure(args, work: Path, data: dict):
    """Every cell of `cell_plan` not yet in `work`, until the time limit, then the passkey diagnosis."""
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder, gguf = model_source(args)
    teacher = load_dense(folder, gguf_file=gguf).to(device).eval()
    converted, distilled = models_for_rows(args, teacher)
    converted, distilled = converted.to(device), distilled.to(device) if distilled is not None else None
    held_out = data["held_out"].tolist()
    started = time.time()
    for row, share, task, length in cell_plan(args):
        if row in DISTILLED_ROWS and distilled is None:
            continue
        if args.time_limit and time.time() - started > args.time_limit:
            break
        model = teacher if share is None else distilled if row in DISTILLED_ROWS else converted
        if share is not None:
            for name, value in {**ROW_DEFAULTS, **ROWS[row], "sea_key_budget": length // share,
                                "sea_query_block_size": args.query_block_size,
                                "sea_block_ranking": args.block_ranking,
                                "sea_group_selection": args.group_selection}.items():
                setattr(model.config, name, value)
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            if task == "ppl":
                result = measure_cell(cell_path(work, row, share, task, length),
                                      lambda: {"perplexity": perplexity(model, held_out, length, args.ppl_tokens)["perplexity"]})
            else:
                trials = data["trials"][f"{task}-{length}"]
                # SEA rows with query blocks read the answer (and `--per-query-tail` prompt tokens) per query, as
                # `generate` does.
                tail = args.per_query_tail if share is not None and args.query_block_size > 1 else None
                result = measure_cell(cell_path(work, row, share, task, length),
                                      lambda: accuracy(model, trials, args.batch_tokens, tail))
        print(f"{row} 1/{share} {task} @ {length}: {result}", flush=True)
    if not args.diagnose:
        return
    length = max(args.lengths)
    passkey = data["trials"][f"passkey-{length}"]
    # Spread over the depths: every k-th trial.
    passkey = {**passkey, **{name: passkey[name][:: max(1, len(passkey[name]) // args.diagnose_trials)]
                             for name in ("input_ids", "needle_starts")}}
    for name, model in zip(DIAGNOSED, (converted, distilled)):
        if model is None:
            continue
        for field, value in {**ROW_DEFAULTS, **ROWS["oracle (exact bin mass)"], "sea_query_block_size": 1,
                             "sea_key_budget": length // args.budget_shares[0]}.items():
            setattr(model.config, field, value)
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            measure_cell(diagnosis_path(work, name, length), lambda: {"layers": diagnose(model, passkey)})


def main(argv=None):
    args = parse_arguments(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare(args, work)
    if args.stage == "prepare":
        print(f"trials and {len(data['held_out']):,} held-out tokens in {work}")
        return
    record = run_record(work, argv, Path(__file__).name, measures=args.stage == "all")
    if args.stage == "all":
        measure(args, work, data)
    report(args, *stored_results(args, work), record)


if __name__ == "__main__":
    main()
