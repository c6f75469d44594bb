import pytest

from sens_peft.hub import plan_upload, push_to_hub, read_card_metadata


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))


@pytest.fixture
def expert(tmp_path):
    folder = tmp_path / "expert"
    folder.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "sensitivity.safetensors", "probe.safetensors",
                 "optimizer.pt", "training_args.bin", "sensitivity_state.safetensors"):
        (folder / name).write_bytes(b"x")
    (folder / "README.md").write_text("---\nbase_model: my/base\ntags:\n- sens-peft\n- merge\n---\n# card\n")
    return folder


def test_plan_includes_sidecars_and_skips_checkpoint_state(expert):
    plan = plan_upload(expert)
    assert plan.files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "probe.safetensors",
                          "sensitivity.safetensors"]
    assert plan.card_metadata == {"base_model": "my/base", "tags": ["sens-peft", "merge"]}
    assert any("training data" in w for w in plan.warnings)


def test_push_warns_about_probe_and_uploads_plan(expert):
    api = FakeApi()
    with pytest.warns(UserWarning, match="training data"):
        plan = push_to_hub(expert, "me/expert", api=api, private=True)
    assert api.calls[0] == ("create_repo", "me/expert", {"private": True, "exist_ok": True})
    upload = api.calls[1][1]
    assert upload["repo_id"] == "me/expert" and upload["allow_patterns"] == plan.files


def test_push_without_probe(expert, recwarn):
    api = FakeApi()
    plan = push_to_hub(expert, "me/expert", api=api, include_probe=False)
    assert "probe.safetensors" not in plan.files and "sensitivity.safetensors" in plan.files
    assert not [w for w in recwarn if "training data" in str(w.message)]


def test_card_metadata_absent(tmp_path):
    assert read_card_metadata(tmp_path) == {}
