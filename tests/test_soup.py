import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from core.cli import main
from core.errors import LensError
from core.pair import ModelSpec, load_encoder
from core.soup import make_soup, mean_state, read_soup, soup_command
from core.training import SOUP_LOG, TRAIN_LOG, read_training_run, save_twin, train_dpr
from tests.conftest import tiny_run

QUERIES = ["a test query", "another one"]


@pytest.fixture(scope="module")
def two_twins(tmp_path_factory, wiki_slice):
    """Two tiny twins of one base, trained in float32: one freely, one distilled toward the base."""
    tmp_path = tmp_path_factory.mktemp("soup")
    _, config = tiny_run(tmp_path, wiki_slice, epochs=2, limit=32, save_fp16=False)
    twins = []
    for name, weight in (("free", 0.0), ("distilled", 1.0)):
        run = replace(config, output=str(tmp_path / name), distill_weight=weight, distill_styles=("description",))
        encoder, report = train_dpr(run, wiki_slice, progress=False)
        twins.append(save_twin(encoder, run, report))
    return twins


def parameters(directory) -> dict[str, torch.Tensor]:
    return load_encoder(ModelSpec("m", str(directory))).query.model.state_dict()


def test_a_soup_is_the_weighted_mean_of_its_twins(two_twins, tmp_path):
    free, distilled = two_twins
    ingredients = make_soup([str(free), str(distilled)], (0.25, 0.75), tmp_path / "soup")
    soup, first, second = parameters(tmp_path / "soup"), parameters(free), parameters(distilled)
    assert not torch.equal(first["encoder.layer.0.output.dense.weight"], second["encoder.layer.0.output.dense.weight"])
    for name, value in soup.items():
        torch.testing.assert_close(value, 0.25 * first[name] + 0.75 * second[name])

    assert not (tmp_path / "soup" / TRAIN_LOG).exists()
    assert read_soup(tmp_path / "soup") == ingredients
    assert [(i.path, i.weight) for i in ingredients] == [(str(free), 0.25), (str(distilled), 0.75)]
    assert [i.config.distill_weight for i in ingredients] == [0.0, 1.0]
    assert soup_command(ingredients, tmp_path / "soup") == (
        f"python -m core soup --twins {free} {distilled} --weights 0.25 0.75 --output {tmp_path / 'soup'}"
    )

    # All the weight on one twin gives that twin back, with its pooling.
    make_soup([str(free), str(distilled)], (1.0, 0.0), tmp_path / "first")
    one, original = load_encoder(ModelSpec("s", str(tmp_path / "first"))), load_encoder(ModelSpec("f", str(free)))
    assert (one.query.pooling, one.query.normalize) == ("mean", True)
    np.testing.assert_allclose(one.encode_queries(QUERIES), original.encode_queries(QUERIES), atol=1e-6)


def test_training_into_a_soups_directory_replaces_its_log_and_card(two_twins, tmp_path, wiki_slice):
    free, distilled = two_twins
    output = tmp_path / "soup"
    make_soup([str(free), str(distilled)], None, output)
    assert [i.weight for i in read_soup(output)] == [0.5, 0.5]
    (output / "README.md").write_text("a card of the soup")
    config, report = read_training_run(free)
    save_twin(load_encoder(ModelSpec("f", str(free))), replace(config, output=str(output)), report)
    assert (output / TRAIN_LOG).is_file()
    assert not (output / SOUP_LOG).exists() and not (output / "README.md").exists()


def test_the_soup_command_writes_the_soup_and_its_card_and_twin_card_rewrites_it(
    two_twins, tmp_path, wiki_slice, monkeypatch, capsys
):
    free, distilled = two_twins
    monkeypatch.setattr("core.cli.load_corpus", lambda path: wiki_slice)
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        '{"query": "which epic poem did virgil write", "gold_ids": ["Aeneid"]}\n'
        '{"query": "which witch lives in a hut on chicken legs", "gold_ids": ["Baba Yaga"]}\n'
    )
    soup, cache = tmp_path / "soup", ["--cache", str(tmp_path / "cache")]
    common = ["--questions-jsonl", str(questions), "--compare", str(free), str(distilled)]
    main([*cache, "soup", "--twins", str(free), str(distilled), "--output", str(soup), *common])
    assert "the mean of 2 twins" in capsys.readouterr().out
    card = (soup / "README.md").read_text()
    assert f"python -m core soup --twins {free} {distilled} --weights 0.5 0.5 --output {soup}" in card
    quality = card.split("## Retrieval quality")[1]
    assert quality.count("| free | ") == quality.count("| distilled | ") == quality.count("| after: this model |") == 2
    assert "### Natural questions, set 1\n\n2 hand-written questions" in quality
    assert "- after minus distilled (paired): R@1 " in quality

    (soup / "README.md").unlink()
    main([*cache, "twin-card", "--twin", str(soup), *common])
    assert (soup / "README.md").read_text() == card
    main([*cache, "twin-card", "--twin", str(free), "--questions-jsonl", str(questions)])
    twin_card = (free / "README.md").read_text()
    assert "Made by DPR Lens's own training command" in twin_card and "model soup" not in twin_card


def test_a_soup_refuses_what_it_cannot_average(two_twins, tmp_path, tiny_bert_dir):
    free, distilled = two_twins
    twins = [str(free), str(distilled)]
    for weights, message in (
        ((0.5,), "1 weights for 2 twins"),
        ((1.5, -0.5), "0 or more and sum to 1"),
        ((0.5, 0.6), "0 or more and sum to 1"),
    ):
        with pytest.raises(LensError, match=message):
            make_soup(twins, weights, tmp_path / "soup")
    with pytest.raises(LensError, match="at least two twins"):
        make_soup(twins[:1], None, tmp_path / "soup")
    with pytest.raises(LensError, match="overwrite its own ingredient"):
        make_soup(twins, None, free)
    with pytest.raises(LensError, match="no train_log.json"):
        make_soup([str(free), str(tiny_bert_dir)], None, tmp_path / "soup")
    with pytest.raises(LensError, match="is not a directory"):
        make_soup([str(free), str(tmp_path / "missing")], None, tmp_path / "soup")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(LensError, match="is a file, not a directory"):
        make_soup(twins, None, tmp_path / "a-file")

    other_pooling = tmp_path / "other-pooling"
    shutil.copytree(distilled, other_pooling)
    lens = json.loads((other_pooling / "dpr_lens.json").read_text())
    (other_pooling / "dpr_lens.json").write_text(json.dumps({**lens, "pooling": "cls"}))
    with pytest.raises(LensError, match="pool or normalise differently"):
        make_soup([str(free), str(other_pooling)], None, tmp_path / "soup")

    other_base = tmp_path / "other-base"
    config, report = read_training_run(distilled)
    report = replace(report, config={**report.config, "base": "another-base"})
    save_twin(load_encoder(ModelSpec("d", str(distilled))), replace(config, output=str(other_base)), report)
    with pytest.raises(LensError, match="different bases"):
        make_soup([str(free), str(other_base)], None, tmp_path / "soup")
    assert not (tmp_path / "soup").exists()

    broken = tmp_path / "broken"
    make_soup(twins, None, broken)
    (broken / SOUP_LOG).write_text('{"twins": []}')
    with pytest.raises(LensError, match="is not a soup log"):
        read_soup(broken)

    state = parameters(free)
    narrower = {**state, "pooler.dense.bias": state["pooler.dense.bias"][:-1]}
    with pytest.raises(LensError, match="differ in architecture"):
        mean_state([state, narrower], (0.5, 0.5))
    ids = torch.arange(4)
    merged = mean_state([{"ids": ids, "w": torch.ones(2)}, {"ids": ids.clone(), "w": torch.zeros(2)}], (0.5, 0.5))
    assert torch.equal(merged["ids"], ids) and torch.equal(merged["w"], torch.full((2,), 0.5))
    with pytest.raises(LensError, match="ids differ"):
        mean_state([{"ids": ids}, {"ids": ids + 1}], (0.5, 0.5))
