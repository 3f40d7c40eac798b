"""Publish a SEA model folder to the Hugging Face Hub in one commit: weights, config, the remote-code bundle,
tokenizer, model card and plots.

    python hub_cards/push.py FOLDER REPO_ID [--private] [--revision BRANCH] [--token TOKEN]

The token comes from --token, else the usual places (HF_TOKEN, `hf auth login`). The card's usage snippet is
re-rendered for REPO_ID first. A failed upload changes nothing on the Hub, leaves the folder as it was, and the
error says what to re-run.
"""

import argparse
import contextlib
import importlib
import os
import shlex
import sys
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from hub_cards.card import write_card


def transport_errors() -> tuple[type[Exception], ...]:
    """The network errors of huggingface_hub's HTTP client: httpx in 1.x, its successor httpx2 in 2.x."""
    found = []
    for name in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except ImportError:
            continue
    return tuple(found)


TRANSPORT_ERRORS = transport_errors()


class PushError(RuntimeError):
    """An upload that did not happen, with what to do about it."""


@contextlib.contextmanager
def restored_on_failure(path: Path):
    """Put `path` back as it was when the block raises: the card is re-rendered for the repository before the
    upload, and a failed push leaves the folder unchanged."""
    before = path.read_bytes() if path.is_file() else None
    try:
        yield
    except BaseException:
        if before is not None:
            path.write_bytes(before)
        raise


def rerun_command(folder, repo_id: str, private: bool | None, revision: str | None) -> str:
    words = ["python", "hub_cards/push.py", str(folder), repo_id]
    words += ["--private"] if private else []
    words += ["--revision", revision] if revision else []
    return shlex.join(words)


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str = "Upload SEA model") -> str:
    """Create `repo_id` if missing (and branch `revision`), then upload `folder` in one commit; returns the
    commit URL."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PushError(f"{folder} is not a model folder (no config.json); pass the output folder of a SEA conversion.")
    api = HfApi(token=token)
    rerun = rerun_command(folder, repo_id, private, revision)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with restored_on_failure(folder / "README.md"):
            if (folder / "eval_results.json").is_file():
                write_card(folder, repo_id)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                       commit_message=commit_message)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise PushError(
                f"The Hub refused the token ({status}) for {repo_id}: pass a token with write access to it "
                f"(--token, HF_TOKEN or `hf auth login`), then re-run: {rerun}"
            ) from error
        raise PushError(f"Uploading {folder} to {repo_id} failed ({error}). Nothing was changed locally; "
                        f"re-run: {rerun}") from error
    except OfflineModeIsEnabled as error:
        raise PushError(f"HF_HUB_OFFLINE is set: unset it to push, then re-run: {rerun}") from error
    except TRANSPORT_ERRORS as error:
        raise PushError(f"Could not reach the Hub at {api.endpoint} ({type(error).__name__}: {error}). Nothing was "
                        f"changed locally; when the network is back, re-run: {rerun}") from error
    return commit.commit_url


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to (created from main if missing)")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    args = parser.parse_args(argv)
    try:
        url = push_to_hub(args.folder, args.repo_id, token=args.token, private=args.private or None,
                          revision=args.revision)
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1)
    print(f"Pushed {args.folder} to {args.repo_id}: {url}")


if __name__ == "__main__":
    main()
