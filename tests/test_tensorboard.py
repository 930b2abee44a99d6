"""TensorBoard events per fold: every epoch's loss, lr, metrics and time; a resumed epoch replaces the killed one."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.cnn.history import write_epochs
from src.cnn.tensorboard import TB_DIR, scalar_tag


def _scalars(log_dir):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _row(epoch, loss):
    return {"epoch": epoch, "phase": "train", "train_loss": loss, "train_images_per_s": 50.0, "lr": 1e-3 / epoch,
            "valid_wll": loss + 0.1, "valid_auc_any": 0.8, "epoch_time_s": 12.5}


def test_each_epoch_is_logged_per_fold(tmp_path):
    history = []
    for epoch, loss in ((1, 0.5), (2, 0.4)):
        history.append(_row(epoch, loss))
        write_epochs(history, tmp_path, "fold0")  # what the training loop calls after every epoch
    got = _scalars(tmp_path / TB_DIR / "fold0")
    assert set(got) == {"train/loss", "train/images_per_s", "lr", "valid/wll", "valid/auc_any", "epoch_time_s"}
    assert [s for s, _ in got["train/loss"]] == [1, 2]
    assert [round(v, 4) for _, v in got["train/loss"]] == [0.5, 0.4]
    assert [round(v, 6) for _, v in got["lr"]] == [0.001, 0.0005]
    assert (tmp_path / "fold0_epochs.csv").exists()


def test_a_resumed_epoch_replaces_what_the_killed_run_logged(tmp_path):
    history = [_row(1, 0.5)]
    write_epochs(history, tmp_path, "fold1")
    history.append(_row(2, 0.9))  # the killed run's epoch 2 ...
    write_epochs(history, tmp_path, "fold1")
    write_epochs([history[0], _row(2, 0.3)], tmp_path, "fold1")  # ... trained again after the resume
    got = _scalars(tmp_path / TB_DIR / "fold1")["train/loss"]
    assert [(s, round(v, 4)) for s, v in got] == [(1, 0.5), (2, 0.3)]


def test_the_fold_holds_one_event_file_whatever_the_writers_counter(tmp_path, monkeypatch):
    """The flake this guards against: event file names end in a per-process counter that sorts as text, so a
    file from writer 10 is read before one from writer 9. Only the newest history's file may be left."""
    import tensorboard.summary.writer.event_file_writer as efw

    counters = iter([9, 10, 11])
    monkeypatch.setattr(efw, "_global_uid", type("Uid", (), {"get": lambda self: next(counters)})(), raising=False)
    history = [_row(1, 0.5), _row(2, 0.9)]
    write_epochs(history, tmp_path, "fold1")
    write_epochs([history[0], _row(2, 0.3)], tmp_path, "fold1")
    log_dir = tmp_path / TB_DIR / "fold1"
    assert len(list(log_dir.iterdir())) == 1
    assert [round(v, 4) for _, v in _scalars(log_dir)["train/loss"]] == [0.5, 0.3]
    assert sorted(p.name for p in (tmp_path / TB_DIR).iterdir()) == ["fold1"]  # no half-swapped folder left


def test_scalar_tags_group_by_split():
    assert scalar_tag("train_loss") == "train/loss" and scalar_tag("valid_auc_any") == "valid/auc_any"
    assert scalar_tag("lr") == "lr" and scalar_tag("epoch_time_s") == "epoch_time_s"
