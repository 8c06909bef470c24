"""``timm-epsa push``: upload a folder made by ``timm-epsa convert`` to the Hugging Face Hub."""
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import CommitInfo, HfApi, constants

from .. import __version__
from ..escaping import first_line
from .cards import card_repo_id
from .download import TransportError, check_revision
from .folder import check_config_fits_weights
from .pretrained import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME
from .repos import check_repo_id

__all__ = ['push_folder']


def push_folder(
        folder: Union[str, Path],
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
) -> CommitInfo:
    """Upload a folder written by ``timm-epsa convert`` to ``repo_id``, creating the repo (and the
    ``revision`` branch) if needed; the returned commit is the one to pin. A network failure is a
    ``ConnectionError`` saying so in one line."""
    folder = Path(folder)
    check_repo_id(repo_id, what='REPO_ID')
    check_revision(revision)
    names = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a folder made by `timm-epsa convert`: it lacks {', '.join(missing)}")
    linked = [name for name in names if (folder / name).is_symlink()]
    if linked:  # convert writes none; a link would upload whatever it points to
        raise ValueError(f"{folder}: {', '.join(linked)} is a symlink, not a file convert wrote; refusing to upload it")
    card_repo = card_repo_id((folder / CARD_NAME).read_text(encoding='utf-8'))
    if card_repo != repo_id:
        raise ValueError(
            f'{folder / CARD_NAME} is written for {card_repo!r}, its usage examples would name the wrong repo; '
            f'convert again with --repo-id {repo_id}')
    check_config_fits_weights(folder)
    api = HfApi(library_name='timm-epsa', library_version=__version__)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=list(names),
            revision=revision,
            commit_message=f'Upload {folder.name} with timm-epsa {__version__}',
        )
    except TransportError as e:
        raise ConnectionError(
            f'cannot reach the Hub at {constants.ENDPOINT} ({first_line(e)}) to push to {repo_id}; check the network (or '
            f'HF_ENDPOINT) and push again (an upload is one commit: one that fails changes nothing)') from e
