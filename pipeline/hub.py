"""Sharing on the Hugging Face Hub: the conversations as a dataset with their data card, a model folder with its.

Each push is one commit of a folder made for it, so the data and its card arrive together and a push that fails
leaves no half-shared repository behind. The dataset is written by `datasets` as the Hub lays datasets out
(data/<split>-00000-of-00001.parquet, and a README.md whose YAML header names the splits), in the records'
`messages` layout. The token comes from where huggingface_hub looks (HF_TOKEN, `hf auth login`) and is never
printed. A failed push is one line (InputError) and changes no local file.
"""

import shutil
import tempfile
from pathlib import Path

from pipeline.knobs import InputError


def check_repo_id(repo_id):
    """Refuse, before any work, a repository name the Hub would refuse at the end (it wants user/name)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        first = str(e).splitlines()[0][:160]
        raise InputError(f"--push-to-hub={repo_id!r}: not a Hub repository name ({first})") from None
    if "/" not in repo_id:
        raise InputError(f"--push-to-hub={repo_id!r}: name it as user/name (or org/name)")


def size_category(n):
    """The Hub's size category of a dataset of n rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def dataset_card(card, splits, *, generator, seed_file, license="apache-2.0"):
    """A dataset README: the Hub's YAML header (license, language, task, size, the splits' files, the generator
    and seed file as tags) above the data card's Markdown."""
    from huggingface_hub import DatasetCardData

    header = DatasetCardData(
        license=license, language=["en"], task_categories=["text-generation"],
        size_categories=[size_category(sum(map(len, splits.values())))], tags=["synthetic", "riddles", "chatml"],
        configs=[{"config_name": "default",
                  "data_files": [{"split": name, "path": f"data/{name}-*.parquet"} for name in splits]}],
        generator=generator, seed_file=str(seed_file))
    return f"---\n{header.to_yaml()}\n---\n\n{card}"


def push_folder(repo_id, folder, *, private=False, repo_type="model", message="Upload"):
    """Create the repository if needed and upload every file under `folder` to it in one commit; a failure is one
    line. Returns the commit's URL."""
    import httpx
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    files = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
             for p in sorted(folder.rglob("*")) if p.is_file()]
    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        info = api.create_commit(repo_id, files, commit_message=message, repo_type=repo_type)
    except (OSError, ValueError, httpx.HTTPError) as e:  # HTTP and network errors, no token, a bad repo id
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"push to {repo_id} failed ({type(e).__name__}: {first[:200]}); local files are "
                         f"unchanged (log in with `hf auth login` or set HF_TOKEN)") from None
    return info.commit_url


def push_dataset(repo_id, splits, card_folder, *, private=False, generator="", seed_file=""):
    """Upload splits {name: records} as a dataset repository, with the data card in card_folder (report.md and
    the pictures it shows) as its README. Returns the commit's URL."""
    import datasets

    splits = {name: rows for name, rows in splits.items() if rows}
    card_folder = Path(card_folder)
    report = card_folder / "report.md"
    card = report.read_text(encoding="utf-8") if report.exists() else "# Riddle conversations\n"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        for name, rows in splits.items():
            datasets.Dataset.from_list(rows).to_parquet(tmp / "data" / f"{name}-00000-of-00001.parquet")
        for picture in card_folder.glob("report_*.png"):
            shutil.copy(picture, tmp / picture.name)
        (tmp / "README.md").write_text(dataset_card(card, splits, generator=generator, seed_file=seed_file),
                                       encoding="utf-8")
        sizes = ", ".join(f"{name} {len(rows):,}" for name, rows in splits.items())
        return push_folder(repo_id, tmp, private=private, repo_type="dataset",
                           message=f"Upload conversations ({sizes})")
