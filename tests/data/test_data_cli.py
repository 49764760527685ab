from __future__ import annotations

import numpy as np

from dynmm.cli import main


def test_prepare_converts_and_prints_the_split_table(tmp_path, mosei_source, capsys):
    source, _ = mosei_source()
    assert main(["data", "prepare", "mosei", "--src", str(source), "--out", str(tmp_path / "mosei")]) == 0
    output = capsys.readouterr().out
    assert "task       regression" in output
    assert "train               5" in output and "total              11" in output


def test_show_prints_metadata_and_split_counts(tmp_path, avmnist_source, capsys):
    source, _ = avmnist_source()
    out = tmp_path / "avmnist"
    main(["data", "prepare", "avmnist", "--src", str(source), "--out", str(out), "--valid-size", "2"])
    capsys.readouterr()
    assert main(["data", "show", str(out)]) == 0
    output = capsys.readouterr().out
    assert "multiclass, 10 classes" in output
    assert "image        (28, 28)" in output and "audio        (112, 112)" in output
    assert "valid               2" in output


def test_bad_input_exits_2_with_a_one_line_error_and_writes_nothing(tmp_path, mosei_source, capsys):
    source, _ = mosei_source(
        lambda data: data["train"].update(vision=np.zeros((5, 50, 36), dtype=np.float32))
    )
    code = main(["data", "prepare", "mosei", "--src", str(source), "--out", str(tmp_path / "mosei")])
    error = capsys.readouterr().err
    assert code == 2
    assert error == (
        "error: mosei_senti_data.pkl: split 'train', key 'vision': "
        "expected shape (N, 50, 35), got (5, 50, 36)\n"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


def test_nonfinite_replace_option_reaches_the_converter(tmp_path, mosei_source, capsys):
    def add_nan(data):
        data["valid"]["audio"][0, 0, 0] = np.nan

    source, _ = mosei_source(add_nan)
    arguments = ["data", "prepare", "mosei", "--src", str(source), "--out", str(tmp_path / "mosei")]
    assert main(arguments) == 2
    assert "nonfinite" in capsys.readouterr().err
    assert main([*arguments, "--nonfinite", "replace"]) == 0
    assert "{'valid/audio': 1}" in capsys.readouterr().out


def test_existing_output_needs_overwrite(tmp_path, avmnist_source, capsys):
    source, _ = avmnist_source()
    arguments = [
        "data",
        "prepare",
        "avmnist",
        "--src",
        str(source),
        "--out",
        str(tmp_path / "a"),
        "--valid-size",
        "2",
    ]
    assert main(arguments) == 0
    assert main(arguments) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*arguments, "--overwrite"]) == 0


def test_options_of_another_kind_and_a_missing_source_exit_2(tmp_path, capsys):
    assert main(["data", "prepare", "mmimdb", "--out", str(tmp_path / "m")]) == 2
    assert "needs the source path (--src)" in capsys.readouterr().err
    assert main(["data", "prepare", "digits", "--out", str(tmp_path / "d"), "--valid-size", "3"]) == 2
    assert "['valid_size'] do not apply to 'digits'" in capsys.readouterr().err


def test_synthetic_mosei_is_generated_with_the_requested_sample_count(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["data", "prepare", "synthetic-mosei", "--out", str(out), "--num-samples", "20"]) == 0
    assert "(synthetic)" in capsys.readouterr().out


def test_show_of_a_folder_without_metadata_exits_2(tmp_path, capsys):
    assert main(["data", "show", str(tmp_path)]) == 2
    assert "dataset.json: not found" in capsys.readouterr().err
