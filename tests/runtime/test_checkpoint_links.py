from lerobot_pirl.runtime.checkpoint import last_checkpoint, point_last_at


def test_last_moves_atomically_and_a_missing_last_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name in ("000001", "000002", "000010", "000011.partial"):
        (checkpoints / name).mkdir(parents=True)
    assert last_checkpoint(tmp_path) == checkpoints / "000010"  # no link yet: newest complete one

    point_last_at(checkpoints / "000001")
    assert last_checkpoint(tmp_path) == (checkpoints / "000001").resolve()
    point_last_at(checkpoints / "000002")  # replaces the existing link
    assert (checkpoints / "last").is_symlink()
    assert last_checkpoint(tmp_path) == (checkpoints / "000002").resolve()
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "000001",
        "000002",
        "000010",
        "000011.partial",
        "last",
    ]
    assert last_checkpoint(tmp_path / "elsewhere") is None
