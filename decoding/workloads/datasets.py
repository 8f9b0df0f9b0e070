"""Real interaction data for measuring what decoding options cost in recommendation quality.

``movielens_100k()`` reads MovieLens-100K (943 users, 1,682 movies, 100,000 ratings with
timestamps, titles, years and genres) from the copy RecBole 1.2.1's wheel ships
(``pip install --no-deps recbole==1.2.1``, 2 MB; RecBole itself is never imported) or from a
folder holding ``ml-100k.inter`` and ``ml-100k.item`` in RecBole's atomic-file format.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution

import numpy as np

INSTALL_HINT = "pip install --no-deps recbole==1.2.1"


@dataclass(frozen=True)
class InteractionData:
    """Users' time-ordered histories with a leave-one-out split.

    Items and users are renumbered ``0..n-1`` in order of first appearance in the file.

    item_ids: the data set's own item id of each item index.
    titles, years, genres: per item index (``years`` -1 where unknown).
    histories: per user, int64 item indices ordered by timestamp (ties keep file order).
    Split (leave-one-out, as TIGER and most sequential recommenders evaluate): a user's last
    item is the test target, the one before it the validation target, the rest training history;
    ``train_sequences`` are the histories without their last two items.
    """

    name: str
    item_ids: list[str]
    titles: list[str]
    years: np.ndarray
    genres: list[list[str]]
    histories: list[np.ndarray]

    @property
    def num_users(self) -> int:
        return len(self.histories)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(h) for h in self.histories))

    @property
    def train_sequences(self) -> list[np.ndarray]:
        return [h[:-2] for h in self.histories]

    def split(self, which: str) -> tuple[list[np.ndarray], np.ndarray]:
        """``(inputs, targets)`` for ``"valid"`` (history up to the second-to-last item) or
        ``"test"`` (history up to the last item); one entry per user."""
        if which == "valid":
            return [h[:-2] for h in self.histories], np.array([h[-2] for h in self.histories], dtype=np.int64)
        if which == "test":
            return [h[:-1] for h in self.histories], np.array([h[-1] for h in self.histories], dtype=np.int64)
        raise ValueError(f"which: expected 'valid' or 'test', got {which!r}")


def _recbole_folder() -> str | None:
    # the installed files, read from the package's metadata: RecBole itself is never imported
    try:
        return str(distribution("recbole").locate_file("recbole/dataset_example/ml-100k"))
    except PackageNotFoundError:
        return None


def _read_atomic(path: str) -> tuple[list[str], list[list[str]]]:
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = [h.split(":")[0] for h in rows[0]]
    return header, rows[1:]


def movielens_100k(path: str | os.PathLike | None = None, *, min_interactions: int = 3) -> InteractionData:
    """MovieLens-100K as :class:`InteractionData`.

    Args:
        path: a folder with ``ml-100k.inter`` and ``ml-100k.item``; default: the copy in the
            installed RecBole wheel (located without importing RecBole).
        min_interactions: users with fewer interactions are dropped (the split needs 3; every
            MovieLens-100K user has at least 20).
    Raises:
        FileNotFoundError: naming the install command when the data set is not found.
    """
    if min_interactions < 3:
        raise ValueError(f"min_interactions: the leave-one-out split needs at least 3, got {min_interactions}")
    folder = os.fspath(path) if path is not None else _recbole_folder()
    files = None if folder is None else (os.path.join(folder, "ml-100k.inter"), os.path.join(folder, "ml-100k.item"))
    if files is None or not all(os.path.isfile(f) for f in files):
        where = "RecBole is not installed" if folder is None else f"no ml-100k.inter / ml-100k.item in {folder}"
        raise FileNotFoundError(f"MovieLens-100K not found ({where}); install the data with `{INSTALL_HINT}` "
                                "or pass path= a folder holding ml-100k.inter and ml-100k.item")
    header, rows = _read_atomic(files[0])
    u, i, ts = header.index("user_id"), header.index("item_id"), header.index("timestamp")
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    events: list[list[tuple[float, int, int]]] = []
    for order, row in enumerate(rows):
        user = users.setdefault(row[u], len(users))
        if user == len(events):
            events.append([])
        item = items.setdefault(row[i], len(items))
        events[user].append((float(row[ts]), order, item))
    histories = [np.array([item for _, _, item in sorted(ev)], dtype=np.int64) for ev in events
                 if len(ev) >= min_interactions]

    header, rows = _read_atomic(files[1])
    meta = {row[header.index("item_id")]: row for row in rows}
    item_ids = list(items)
    titles, years, genres = [], np.full(len(item_ids), -1, dtype=np.int64), []
    for index, raw in enumerate(item_ids):
        row = meta.get(raw)
        titles.append(row[header.index("movie_title")] if row else "")
        year = row[header.index("release_year")] if row else ""
        if year.isdigit():
            years[index] = int(year)
        genres.append(row[header.index("class")].split() if row else [])
    return InteractionData("ml-100k", item_ids, titles, years, genres, histories)
