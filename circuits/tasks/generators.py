"""The built-in tasks' generators: each builds its task for the model in use (its tokenizer and
vocabulary); `circuits.tasks.builtin` lists them.

Every text task checks its single-token constraints against the tokenizer: items that do not
fit (a name that is two tokens, a year that does not split as century + two digits, ...) are
dropped and counted in `task.meta["dropped"]`; a task left with too few examples is refused.
Where an assumption fails for a whole tokenizer family the task is adapted instead (greater-than
on digit-level tokenizers predicts the tens digit); README "Tasks per tokenizer" says what each
task means for each family.
"""

from __future__ import annotations

import random

import torch

from circuits.model import tracr
from circuits.tasks.task import Metric, Task, TaskError, from_pairs, pad_id

NAMES_A = [" Mary", " John", " Tom", " James", " Paul", " Sarah", " Anna", " David", " Mark", " Lisa",
           " Michael", " Kate", " Jack", " Emma", " Peter", " Laura", " Daniel", " Alice", " Robert", " Susan"]
PLACES = ["store", "park", "school", "office", "hospital", "station", "garden", "restaurant"]
OBJECTS = ["drink", "book", "ball", "key", "gift", "letter", "ring", "bag"]
IOI_TEMPLATES = [
    "When{A} and{B} went to the {place},{C} gave a {obj} to",
    "Then,{A} and{B} had a long argument, and afterwards{C} said to",
    "After{A} and{B} went to the {place},{C} gave a {obj} to",
    "While{A} and{B} were working at the {place},{C} gave a {obj} to",
]
COUNTRIES = [(" France", " Paris"), (" Germany", " Berlin"), (" Italy", " Rome"), (" Spain", " Madrid"),
             (" Japan", " Tokyo"), (" Russia", " Moscow"), (" China", " Beijing"), (" Egypt", " Cairo"),
             (" Greece", " Athens"), (" Canada", " Ottawa"), (" Poland", " Warsaw"), (" Austria", " Vienna"),
             (" Ireland", " Dublin"), (" Norway", " Oslo"), (" Sweden", " Stockholm"), (" Cuba", " Havana"),
             (" Peru", " Lima"), (" Kenya", " Nairobi"), (" Iran", " Tehran"), (" Portugal", " Lisbon")]
NOUNS = [(" author", " authors"), (" teacher", " teachers"), (" doctor", " doctors"), (" player", " players"),
         (" farmer", " farmers"), (" student", " students"), (" officer", " officers"), (" writer", " writers"),
         (" driver", " drivers"), (" manager", " managers"), (" artist", " artists"), (" lawyer", " lawyers"),
         (" singer", " singers"), (" pilot", " pilots"), (" nurse", " nurses"), (" soldier", " soldiers")]
ATTRACTORS = [" table", " house", " river", " garden", " window", " road", " bridge", " city"]
MALE = [" John", " James", " David", " Michael", " Robert", " Paul", " Mark", " Peter", " Daniel", " Thomas",
        " George", " Richard", " Steven", " Kevin", " Brian", " Jason"]
FEMALE = [" Mary", " Sarah", " Anna", " Lisa", " Laura", " Emma", " Kate", " Susan", " Jessica", " Emily",
          " Rachel", " Linda", " Karen", " Nancy", " Amy", " Helen"]
PRONOUN_TEMPLATES = ["{N} went to the {place} because", "{N} was late to the {place}, so", "{N} said that"]
NOUNS_YEAR = ["war", "drought", "expedition", "siege", "reign", "project", "dynasty", "voyage"]


class _Vocab:
    """Single-token checks against a tokenizer, counting what is dropped."""

    def __init__(self, model, task: str):
        if model.tokenizer is None:
            raise TaskError(f"{task} needs a tokenizer; {model.spec} has none (use the induction task "
                            f"or a task file with token ids)")
        self.tok = model.tokenizer
        self.vocab = model.arch.d_vocab
        self.task = task
        self.dropped: dict[str, int] = {}

    def one(self, text: str) -> int | None:
        ids = self.tok.encode(text)
        return ids[0] if len(ids) == 1 and ids[0] < self.vocab else None

    def keep(self, items, key, reason: str) -> list:
        """Keep the items whose texts are all single tokens."""
        out = []
        for item in items:
            if all(self.one(t) is not None for t in key(item)):
                out.append(item)
            else:
                self.dropped[reason] = self.dropped.get(reason, 0) + 1
        return out

    def encode(self, text: str) -> list[int]:
        bos = getattr(self.tok, "bos_token_id", None)
        return ([bos] if bos is not None else []) + self.tok.encode(text)

    def finish(self, name, clean, corrupted, answers, wrongs, metric, n, extra=None) -> Task:
        kept = [i for i, (c, x) in enumerate(zip(clean, corrupted)) if len(c) == len(x)]
        if len(kept) < len(clean):
            self.dropped["clean/corrupted token lengths differ"] = len(clean) - len(kept)
        if len(kept) < min(n, 8):
            raise TaskError(f"{name}: only {len(kept)} valid examples with this tokenizer "
                            f"(dropped: {self.dropped or 'none'}); need at least {min(n, 8)}")
        pick = lambda xs: [xs[i] for i in kept[:n]]
        meta = {"generator": name, "dropped": dict(self.dropped), **(extra or {})}
        return from_pairs(name, pick(clean), pick(corrupted), pick(answers), pick(wrongs), metric,
                          pad_id=pad_id(self.tok), meta=meta)


def induction(model, n: int = 64, seed: int = 0, half: int = 10) -> Task:
    """Repeated random tokens: BOS r_1..r_k r_1..r_{k-1} → r_k. The corrupted prompt replaces the
    first half by other random tokens, so only induction can tell the answer; the wrong answer is
    the corrupted prompt's token at the answer's place in the sequence (r'_k)."""
    bos = model.meta.get("bos_token_id", getattr(model.tokenizer, "bos_token_id", None))
    lo, hi = model.meta.get("content_tokens", [1, min(model.arch.d_vocab, 50257) - 2])
    if hi - lo + 1 < 2 * half:
        raise TaskError(f"induction needs at least {2 * half} content tokens, the model has {hi - lo + 1}")
    gen = torch.Generator().manual_seed(seed)
    clean, corrupted, answers, wrongs = [], [], [], []
    prefix = [bos] if bos is not None else []
    for _ in range(n):
        perm = (torch.randperm(hi - lo + 1, generator=gen)[: 2 * half] + lo).tolist()
        r, other = perm[:half], perm[half:]
        clean.append(prefix + r + r[:-1])
        corrupted.append(prefix + other + r[:-1])
        answers.append([r[-1]])
        wrongs.append([other[-1]])
    return from_pairs("induction", clean, corrupted, answers, wrongs, Metric.LOGIT_DIFF,
                      meta={"generator": "induction", "n": n, "seed": seed, "half": half})


def ioi(model, n: int = 64, seed: int = 0) -> Task:
    """Indirect object identification, ABBA and BABA orders; ABC corruption (three other names)."""
    v = _Vocab(model, "ioi")
    names = v.keep(NAMES_A, lambda x: [x], "name is not one token")
    if len(names) < 5:
        raise TaskError(f"ioi: only {len(names)} single-token names with this tokenizer")
    rng = random.Random(seed)
    clean, corrupted, answers, wrongs = [], [], [], []
    for i in range(n * 2):
        io_, s, a, b, c = rng.sample(names, 5)
        tpl, place, obj = rng.choice(IOI_TEMPLATES), rng.choice(PLACES), rng.choice(OBJECTS)
        first, second = (io_, s) if i % 2 == 0 else (s, io_)             # ABBA / BABA
        clean.append(v.encode(tpl.format(A=first, B=second, C=s, place=place, obj=obj)))
        corrupted.append(v.encode(tpl.format(A=a, B=b, C=c, place=place, obj=obj)))
        answers.append([v.one(io_)])
        wrongs.append([v.one(s)])
    return v.finish("ioi", clean, corrupted, answers, wrongs, Metric.LOGIT_DIFF, n,
                    {"n": n, "seed": seed, "orders": ["ABBA", "BABA"], "corruption": "ABC"})


def _digit_level(v: "_Vocab") -> bool:
    """True for tokenizers that spell numbers one digit per token (Llama-3/SmolLM/Qwen style):
    every digit is one token and a year is one token per digit."""
    digits = [v.one(str(d)) for d in range(10)]
    return all(d is not None for d in digits) and v.tok.encode("1732")[-4:] == [digits[1], digits[7], digits[3], digits[2]]


def greater_than(model, n: int = 64, seed: int = 0) -> Task:
    """"The war lasted from the year 17YY to the year 17" → a year above YY. Corrupted: YY = 01.

    Tokenizers with two-digit year tokens (GPT-2 style): the next token is the end year's last
    two digits; metric: probability of two-digit years above YY minus YY and below (Hanna et al.
    2023). Digit-level tokenizers (one token per digit, e.g. SmolLM2, Llama 3): the next token is
    the end year's tens digit; answers are the tens digits above the start year's tens digit T,
    wrong answers those below it (T itself is left out: 1732 → 1738 and 1732 → 1731 both start
    with 3), so the metric is P(tens digit > T) − P(tens digit < T); T ranges over 1..8.
    """
    v = _Vocab(model, "greater-than")
    if _digit_level(v):
        return _greater_than_digits(v, n, seed)
    digits = {yy: v.one(f"{yy:02d}") for yy in range(100)}
    rng = random.Random(seed)
    clean, corrupted, answers, wrongs = [], [], [], []
    for _ in range(n * 2):
        century, yy, noun = rng.choice([11, 12, 13, 14, 15, 16, 17, 18]), rng.randint(2, 98), rng.choice(NOUNS_YEAR)
        text = f"The {noun} lasted from the year {century}{yy:02d} to the year {century}"
        bad = f"The {noun} lasted from the year {century}01 to the year {century}"
        c_ids, x_ids = v.encode(text), v.encode(bad)
        cent = v.one(f" {century}")
        splits = (cent is not None and digits[yy] is not None and digits[1] is not None
                  and v.tok.encode(f" {century}{yy:02d}") == [cent, digits[yy]]
                  and v.tok.encode(f" {century}01") == [cent, digits[1]])
        if not splits:
            reason = "year does not split as century + two digits"
            v.dropped[reason] = v.dropped.get(reason, 0) + 1
            continue
        above = [digits[y] for y in range(yy + 1, 100) if digits[y] is not None]
        below = [digits[y] for y in range(0, yy + 1) if digits[y] is not None]
        clean.append(c_ids)
        corrupted.append(x_ids)
        answers.append(above)
        wrongs.append(below)
    return v.finish("greater-than", clean, corrupted, answers, wrongs, Metric.PROB_DIFF, n,
                    {"n": n, "seed": seed, "tokenization": "two-digit years"})


def _greater_than_digits(v: "_Vocab", n: int, seed: int) -> Task:
    """greater-than for digit-level tokenizers: predict the end year's tens digit (see above)."""
    digit = [v.one(str(d)) for d in range(10)]
    rng = random.Random(seed)
    clean, corrupted, answers, wrongs = [], [], [], []
    for _ in range(n * 2):
        century, yy, noun = rng.choice([11, 12, 13, 14, 15, 16, 17, 18]), rng.randint(10, 89), rng.choice(NOUNS_YEAR)
        tens = yy // 10
        clean.append(v.encode(f"The {noun} lasted from the year {century}{yy:02d} to the year {century}"))
        corrupted.append(v.encode(f"The {noun} lasted from the year {century}01 to the year {century}"))
        answers.append([digit[d] for d in range(tens + 1, 10)])
        wrongs.append([digit[d] for d in range(0, tens)])
    return v.finish("greater-than", clean, corrupted, answers, wrongs, Metric.PROB_DIFF, n,
                    {"n": n, "seed": seed, "tokenization": "one token per digit",
                     "answer": "tens digit of the end year: above the start year's (answers) vs below (wrong)"})


def subject_verb(model, n: int = 64, seed: int = 0) -> Task:
    """"The author(s) near the table" → " is" / " are"; corrupted flips the subject's number."""
    v = _Vocab(model, "sva")
    nouns = v.keep(NOUNS, lambda p: list(p), "singular or plural noun is not one token")
    attractors = v.keep(ATTRACTORS, lambda x: [x], "attractor is not one token")
    is_, are = v.one(" is"), v.one(" are")
    rng = random.Random(seed)
    clean, corrupted, answers, wrongs = [], [], [], []
    for i in range(n * 2):
        (sg, pl), att = rng.choice(nouns), rng.choice(attractors)
        plural = i % 2 == 1
        subj, other = (pl, sg) if plural else (sg, pl)
        clean.append(v.encode(f"The{subj} near the{att}"))
        corrupted.append(v.encode(f"The{other} near the{att}"))
        answers.append([are if plural else is_])
        wrongs.append([is_ if plural else are])
    return v.finish("sva", clean, corrupted, answers, wrongs, Metric.LOGIT_DIFF, n, {"n": n, "seed": seed})


def capital_country(model, n: int = 64, seed: int = 0) -> Task:
    """"The capital of France is" → " Paris"; corrupted asks for another country."""
    v = _Vocab(model, "capital-country")
    pairs = v.keep(COUNTRIES, lambda p: list(p), "country or capital is not one token")
    if len(pairs) < 2:
        raise TaskError(f"capital-country: only {len(pairs)} single-token country/capital pairs")
    rng = random.Random(seed)
    clean, corrupted, answers, wrongs = [], [], [], []
    for _ in range(n):
        (c1, cap1), (c2, cap2) = rng.sample(pairs, 2)
        clean.append(v.encode(f"The capital of{c1} is"))
        corrupted.append(v.encode(f"The capital of{c2} is"))
        answers.append([v.one(cap1)])
        wrongs.append([v.one(cap2)])
    return v.finish("capital-country", clean, corrupted, answers, wrongs, Metric.LOGIT_DIFF, n,
                    {"n": n, "seed": seed, "pairs": len(pairs)})


def gendered_pronoun(model, n: int = 64, seed: int = 0) -> Task:
    """"Mary went to the park because" → " she"; corrupted uses a name of the other gender."""
    v = _Vocab(model, "pronoun")
    # the templates start with the name, so it is tokenized without its leading space
    male = v.keep(MALE, lambda x: [x.strip()], "name is not one token at the start of a sentence")
    female = v.keep(FEMALE, lambda x: [x.strip()], "name is not one token at the start of a sentence")
    he, she = v.one(" he"), v.one(" she")
    rng = random.Random(seed)
    clean, corrupted, answers, wrongs = [], [], [], []
    for i in range(n * 2):
        tpl, place = rng.choice(PRONOUN_TEMPLATES), rng.choice(PLACES)
        is_f = i % 2 == 1
        name, other = (rng.choice(female), rng.choice(male)) if is_f else (rng.choice(male), rng.choice(female))
        clean.append(v.encode(tpl.format(N=name.strip(), place=place)))
        corrupted.append(v.encode(tpl.format(N=other.strip(), place=place)))
        answers.append([she if is_f else he])
        wrongs.append([he if is_f else she])
    return v.finish("pronoun", clean, corrupted, answers, wrongs, Metric.LOGIT_DIFF, n, {"n": n, "seed": seed})


# ---- a tracr model's own program ---------------------------------------------------------

def tracr_task(model, n: int = 64, seed: int = 0, min_len: int = 2):
    """The compiled program's own task: BOS + random inputs of min_len..max_seq_len values,
    scored at the last position (padding is masked out of attention, as tracr does).

    Categorical programs: answer = the program's output token, wrong = the other output values,
    metric KL to the clean run. Numerical programs (proportion): metric MSE to the clean output.
    Corrupted prompts are other random inputs of the same length (used by resample ablation).
    """
    tr = model.meta.get("tracr")
    if not tr:
        raise TaskError(f"the tracr task needs a tracr-compiled model (tracr-reverse, tracr-proportion, "
                        f"tracr-sort); {model.spec} is not one")
    program = tracr.PROGRAMS[tr["program"]]
    vocab = [v for v in tr["input_vocab"] if v not in (tr["bos"], tr["pad"])]
    rng = random.Random(seed)
    enc = model.tokenizer.encode
    clean, corrupted, answers, wrongs = [], [], [], []
    for _ in range(n):
        length = rng.randint(min_len, tr["max_seq_len"])
        xs, ys = tracr.sample(program, rng, length, vocab), tracr.sample(program, rng, length, vocab)
        clean.append(enc(" ".join([tr["bos"]] + xs)))
        corrupted.append(enc(" ".join([tr["bos"]] + ys)))
        out = program.reference(xs)
        if tr["categorical"]:
            answer = tr["output_vocab"].index(str(out))
            answers.append([answer])
            wrongs.append([i for i in range(len(tr["output_vocab"])) if i != answer])
        else:
            answers.append([0])
            wrongs.append([])
    metric = Metric.KL if tr["categorical"] else Metric.MSE
    return from_pairs(f"tracr-{program.name}", clean, corrupted, answers, wrongs, metric,
                      pad_id=model.tokenizer.pad_token_id,
                      meta={"generator": "tracr", "program": program.name, "n": n, "seed": seed,
                            "ground_truth_ablations": ["zero", "resample"]})
