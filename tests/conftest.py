import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("CIRCUITS_TEST_THREADS", "1")))

TINY = ["random:gpt2-tiny", "random:neox-tiny", "random:llama-tiny", "random:native-tiny",
        "random:native-llama-tiny"]

_cache = {}


def load_model(spec: str):
    from circuits.model import loader
    if spec not in _cache:
        _cache[spec] = loader.load(spec)
    return _cache[spec]


@pytest.fixture(params=TINY)
def tiny(request):
    return load_model(request.param)


def random_task(model, n=4, length=7, seed=1, vary_lengths=False):
    from circuits.tasks.task import from_pairs
    g = torch.Generator().manual_seed(seed)
    hi = min(model.arch.d_vocab, 1000)
    clean = torch.randint(1, hi, (n, length), generator=g).tolist()
    corrupted = torch.randint(1, hi, (n, length), generator=g).tolist()
    if vary_lengths:
        cut = [length - (i % 3) for i in range(n)]
        clean = [c[:k] for c, k in zip(clean, cut)]
        corrupted = [c[:k] for c, k in zip(corrupted, cut)]
    answers = torch.randint(1, hi, (n, 1), generator=g).tolist()
    wrongs = torch.randint(1, hi, (n, 1), generator=g).tolist()
    return from_pairs("random", clean, corrupted, answers, wrongs)
