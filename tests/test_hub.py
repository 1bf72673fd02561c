"""An exported repo folder, and its upload to the Hub.

The upload tests run huggingface_hub's own code down to its HTTP client: the client factory is
swapped for one whose transport is a fake Hub answering the endpoints a commit needs (create
repo, create branch, validate README metadata, preupload, commit) and recording every request.
"""

import json
import re
import shlex

import pytest
import torch
from huggingface_hub import constants
from PIL import Image

import nearid.hub
from nearid.hub import REQUIRED_REPO_FILES, HubPushError, push_to_hub
from tests.fake_hub import commit_payload
from tests.helpers import (
    REPO_ID,
    REPO_ROOT,
    make_tiny_processor,
    project_requirements,
    rounded_tiny_nearid,
    snapshot,
    user_error,
)

TOKEN = "hf_fake_write_token"


# --------------------------------------------------------------------------------------------------
# Export


def test_export_with_a_card_is_one_complete_folder(repo):
    assert set(snapshot(repo)) == {*REQUIRED_REPO_FILES, "README.md"}
    assert [p.name for p in repo.parent.iterdir()] == [repo.name]  # no staging folder left


def test_quick_start_of_the_card_scores_two_images(remote_code_checks):
    """The card's python block, run on the exported folder in a fresh interpreter (tests/remote_code_checks.py)."""
    check = remote_code_checks["quick_start"]
    assert f'REPO = "{REPO_ID}"' in (check.folder / "nearid-quick-start" / "README.md").read_text()
    score = float(re.search(r"identity score: (\S+)", check.stdout).group(1))
    assert check.imported_remote_code("modeling_nearid", "image_processing_nearid")  # the folder's copy, afresh
    loaded = [Image.open(check.folder / "reference.jpg"), Image.open(check.folder / "generated.png")]
    with torch.no_grad():
        embeds = rounded_tiny_nearid().get_image_features(**make_tiny_processor()(loaded, return_tensors="pt"))
    assert score == pytest.approx((embeds[0] @ embeds[1]).item(), abs=2e-4)


# --------------------------------------------------------------------------------------------------
# Upload, against a fake Hub at huggingface_hub's HTTP boundary


def test_push_uploads_the_whole_folder_in_one_commit(repo, hub):
    url = push_to_hub(repo, REPO_ID, private=True, revision="experiment", commit_message="Run 3", token=TOKEN)

    commits = hub.calls("commit/")
    assert len(commits) == 1
    assert commits[0].url.path == f"/api/models/{REPO_ID}/commit/experiment"
    header, files = commit_payload(commits[0])
    assert header["summary"] == "Run 3"
    assert files == snapshot(repo)
    assert url == f"https://huggingface.co/{REPO_ID}/commit/{'c' * 40}"

    created = json.loads(hub.calls("repos/create")[0].content)
    assert created["visibility"] == "private" or created.get("private") is True  # huggingface_hub 2.x / 1.x
    assert [r.url.path for r in hub.calls("branch/")] == [f"/api/models/{REPO_ID}/branch/experiment"]
    repo_calls = [r for r in hub.requests if r.url.path.startswith(("/api/models/", "/api/repos/"))]
    assert len(repo_calls) == 4  # create repo, create branch, preupload, commit
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in repo_calls)


def test_push_to_main_leaves_visibility_to_the_hub(repo, hub):
    push_to_hub(repo, REPO_ID, token=TOKEN)

    created = json.loads(hub.calls("repos/create")[0].content)
    assert "visibility" not in created and "private" not in created
    assert hub.calls("branch/") == []
    assert [r.url.path for r in hub.calls("commit/")] == [f"/api/models/{REPO_ID}/commit/main"]
    assert commit_payload(hub.calls("commit/")[0])[0]["summary"] == nearid.hub.DEFAULT_COMMIT_MESSAGE


def test_push_as_a_pull_request_returns_its_url(repo, hub):
    url = push_to_hub(repo, REPO_ID, create_pr=True, token=TOKEN)

    commits = hub.calls("commit/")
    assert [r.url.params.get("create_pr") for r in commits] == ["1"]
    assert commit_payload(commits[0])[1] == snapshot(repo)
    assert url == f"https://huggingface.co/{REPO_ID}/discussions/7"


def test_push_without_a_token_says_how_to_log_in_before_any_request(repo, hub, tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_here"))

    with pytest.raises(HubPushError) as error:
        push_to_hub(repo, REPO_ID, revision="experiment", create_pr=True)

    message = str(error.value)
    assert "hf auth login" in message and "HF_TOKEN" in message
    assert f"push --folder {repo} --repo-id {REPO_ID} --create-pr --revision experiment" in message
    assert hub.requests == []


def test_push_refuses_an_incomplete_folder(repo, hub):
    (repo / "model.safetensors").unlink()
    (repo / "modeling_nearid.py").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors, modeling_nearid.py"):
        push_to_hub(repo, REPO_ID, token=TOKEN)
    assert hub.requests == []


def test_failed_commit_keeps_the_folder_and_the_retry_command_works(repo, hub, capsys):
    before = snapshot(repo)
    hub.commit_status = 500

    with pytest.raises(HubPushError) as error:
        push_to_hub(repo, REPO_ID, revision="experiment", commit_message="Run 3", token=TOKEN)

    message = str(error.value)
    assert "500" in message and "intact" in message
    assert snapshot(repo) == before
    retry = shlex.split(message.splitlines()[-1])
    if retry[0] == "cd":  # the command says where to run it from, unless the tests run from there
        assert retry[1] == str(REPO_ROOT) and retry[2] == "&&"
        retry = retry[3:]
    assert retry[:4] == ["python", "-m", "nearid.hub", "push"]

    hub.commit_status = 200
    hub.requests.clear()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_TOKEN", TOKEN)
        assert nearid.hub.main(retry[3:]) == 0
    assert capsys.readouterr().out.strip() == f"https://huggingface.co/{REPO_ID}/commit/{'c' * 40}"
    commits = hub.calls("commit/")
    assert [r.url.path for r in commits] == [f"/api/models/{REPO_ID}/commit/experiment"]
    header, files = commit_payload(commits[0])
    assert header["summary"] == "Run 3" and files == before


def test_network_failure_keeps_the_folder(repo, hub):
    before = snapshot(repo)
    hub.network_down = True
    with pytest.raises(HubPushError, match="(?s)ConnectError.*intact.*--repo-id"):
        push_to_hub(repo, REPO_ID, token=TOKEN)
    assert snapshot(repo) == before
    assert hub.calls("commit/") == []


def test_cli_reports_a_missing_folder(tmp_path, hub, capsys):
    message = user_error(capsys, nearid.hub.main, ["push", "--folder", str(tmp_path / "absent"), "--repo-id", REPO_ID])
    assert "is not a folder" in message
    assert hub.requests == []


# --------------------------------------------------------------------------------------------------
# What a release card claims, checked before the upload


def test_a_release_trained_on_local_data_pushes_a_card_without_local_paths_or_false_claims(
        train_synthetic, base_model, tmp_path, hub, monkeypatch, capsys):
    """The demo's case: a local base model folder and local synthetic data, trained, exported and pushed."""
    from huggingface_hub import ModelCard

    from nearid.commands import train
    from tests.helpers import train_args

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    results = train.main(train_args(train_synthetic, base_model, tmp_path / "run", "--max-steps", "2",
                                    "--push-to-hub", REPO_ID))

    _, files = commit_payload(hub.calls("commit/")[0])
    text = files["README.md"].decode()
    front_matter = text.split("\n---\n", 1)[0]
    metadata = ModelCard(text).data.to_dict()
    for local in (str(tmp_path), str(train_synthetic), str(base_model), "positives", "tiny-siglip"):
        assert local not in front_matter
    assert "base_model" not in metadata and "datasets" not in metadata
    assert "model-index" not in metadata and "Aleksandar/NearID" not in front_matter  # no Hub claim for local data
    assert metadata["library_name"] == "transformers" and "custom_code" in metadata["tags"]
    # The text says what was used and measured, as local data, with no paths of this machine.
    datasets_section = text.split("Datasets:\n\n")[1].split("\n\n")[0]
    assert "local data `positives` (save_to_disk" in datasets_section and str(tmp_path) not in datasets_section
    assert "a local SigLIP checkpoint `tiny-siglip`" in text
    evaluation = text.split("## Evaluation\n\n")[1].split("\n## ")[0]
    assert "NearID benchmark (local data)" in evaluation and "NearID SSR" in evaluation
    # What the card lacks is said on the console and recorded in train_results.json.
    said = [line.removeprefix("warning: ") for line in capsys.readouterr().err.splitlines()
            if line.startswith("warning: model card: ")]
    assert len(said) == 3
    assert "no base_model" in said[0] and "local folder" in said[0]
    assert "datasets list leaves them out" in said[1] and "4 training dataset(s)" in said[1]
    assert "not in its model-index" in said[2] and "evaluation widget" in said[2]
    written = json.loads((tmp_path / "run" / "train_results.json").read_text())["warnings"]
    assert [w for w in results["warnings"] if w.startswith("model card: ")] == said == \
        [w for w in written if w.startswith("model card: ")]


def test_push_refuses_metadata_the_hub_would_reject_before_any_request(repo, hub, tmp_path):
    base = tmp_path / "my-siglip"
    base.mkdir()
    readme = repo / "README.md"
    text = readme.read_text()
    readme.write_text(text.replace("base_model: google/siglip2-so400m-patch14-384", f"base_model: {base}")
                      .replace("- Aleksandar/NearID-Flux", "- ./data/positives", 1))
    before = snapshot(repo)
    with pytest.raises(ValueError) as error:
        push_to_hub(repo, REPO_ID, token=TOKEN)
    message = str(error.value)
    assert f"base_model '{base}' is not a Hub id (namespace/name) but a local path" in message
    assert "datasets './data/positives' is not a Hub id" in message and "Nothing was uploaded" in message
    assert hub.requests == [] and snapshot(repo) == before


# The web app as a Space


def test_push_space_uploads_the_app_with_the_package_in_one_commit(hub):
    from nearid.hub import push_space

    url = push_space("someone/nearid-app", token=TOKEN)
    created = json.loads(hub.calls("repos/create")[0].content)
    assert created["type"] == "space" and created["sdk"] == "gradio"
    commits = hub.calls("commit/")
    assert len(commits) == 1 and commits[0].url.path == "/api/spaces/someone/nearid-app/commit/main"
    _, files = commit_payload(commits[0])
    assert {"app.py", "README.md", "requirements.txt", "nearid/__init__.py", "nearid/api.py", "nearid/heatmaps.py",
            "modeling_nearid.py", "configuration_nearid.py", "image_processing_nearid.py"} <= set(files)
    assert files["app.py"] == (REPO_ROOT / "space" / "app.py").read_bytes()
    assert b"sdk: gradio" in files["README.md"] and not any("__pycache__" in name for name in files)
    assert url == f"https://huggingface.co/someone/nearid-app/commit/{'c' * 40}"


@pytest.mark.parametrize("upload", ["model", "space"])
@pytest.mark.parametrize("source", ["explicit", "environment", "none"])
def test_both_uploads_take_the_token_given_else_the_environments_else_refuse(upload, source, hub, tmp_path,
                                                                             monkeypatch, request):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_here"))
    if source != "none":
        monkeypatch.setenv("HF_TOKEN", "hf_environment_token")
    given = TOKEN if source == "explicit" else None
    if upload == "model":
        folder = request.getfixturevalue("repo")
        push, retry = (lambda: push_to_hub(folder, REPO_ID, token=given)), f"push --folder {folder} --repo-id {REPO_ID}"
    else:
        push, retry = (lambda: nearid.hub.push_space(REPO_ID, token=given)), f"push-space --repo-id {REPO_ID}"

    if source == "none":
        with pytest.raises(HubPushError) as error:
            push()
        message = str(error.value)
        assert "No Hugging Face token found" in message and "hf auth login" in message and "HF_TOKEN" in message
        assert message.endswith(retry)
        assert hub.requests == []
    else:
        push()
        expected = TOKEN if source == "explicit" else "hf_environment_token"
        repo_calls = [r for r in hub.requests if r.url.path.startswith(("/api/models/", "/api/spaces/", "/api/repos/"))]
        assert repo_calls and {r.headers.get("authorization") for r in repo_calls} == {f"Bearer {expected}"}


def test_space_requirements_are_the_librarys_runtime_requirements():
    """The Space installs its own requirements.txt: every package the library needs, with the same floors."""
    lines = (line.split("#")[0].strip() for line in (REPO_ROOT / "space" / "requirements.txt").read_text().splitlines())
    pairs = (re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", line).groups() for line in lines if line and line[0] != "-")
    assert {name.lower(): specifier for name, specifier in pairs} == project_requirements()
