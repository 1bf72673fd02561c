"""One definition of a Hub repo id: model loading, dataset reading and the model card agree on every string."""

import pytest

from nearid import card, hub_ids, loading
from nearid.data import readers

HUB_IDS = ["Aleksandar/NearID", "google/siglip2-so400m-patch14-384", "a/b.c_d-e", "0/x"]
NOT_HUB_IDS = ["owner/.hidden", "owner/-dash", "owner/b..c", "../up", "./local", "/abs/path", "~/x", "a/b/c",
               "no spaces/x", "", "lone"]


@pytest.mark.parametrize("text", HUB_IDS)
def test_every_reader_takes_a_hub_id(text):
    assert hub_ids.is_hub_id(text) and loading.is_hub_id(text) and card.is_hub_id(text)
    assert readers._looks_like_hub_id(text)


@pytest.mark.parametrize("text", NOT_HUB_IDS)
def test_every_reader_refuses_what_is_not_a_hub_id(text):
    assert not hub_ids.is_hub_id(text) and not loading.is_hub_id(text) and not card.is_hub_id(text)
    assert readers._looks_like_hub_id(text) == (text == "lone")  # a dataset may be a canonical name without owner


def test_an_existing_folder_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "model").mkdir(parents=True)
    assert hub_ids.looks_like_hub_id("owner/model")
    assert not hub_ids.is_hub_id("owner/model") and not loading.is_hub_id("owner/model")
    assert not card.is_hub_id("owner/model")
