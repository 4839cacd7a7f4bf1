"""Corrupt and malformed input: a DataError naming file, line and field, or a counted skip."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from sharding.config import DomainSource, ProcessingConfig
from sharding.readers import read_domain
from unisrec.errors import DataError

NO_KCORE = ProcessingConfig(kcore=0)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def tsv(*values: object) -> str:
    return "\t".join(str(v) for v in values)


def csv_source(directory: Path, **options) -> DomainSource:
    return DomainSource(name="c", format="csv", path=str(directory), **options)


def write_csv_domain(directory: Path, interactions: list[str], items: list[str] | None = None):
    write_lines(directory / "interactions.csv", ["user,item,timestamp", *interactions])
    write_lines(directory / "items.csv", ["item,text", *(items or ["a,A", "b,B", "c,C"])])


GOOD_ROWS = ["u,a,1", "u,b,2", "u,c,3"]


# --- missing files and columns ------------------------------------------------------------


def test_missing_interactions_file_names_the_path(tmp_path):
    write_csv_domain(tmp_path, GOOD_ROWS)
    with pytest.raises(DataError, match="file not found") as err:
        read_domain(csv_source(tmp_path, interactions="nope.csv"), NO_KCORE)
    assert err.value.file == str(tmp_path / "nope.csv")


def test_directory_without_an_items_table_asks_for_the_option(tmp_path):
    write_lines(tmp_path / "interactions.csv", ["user,item,timestamp", *GOOD_ROWS])
    with pytest.raises(DataError, match="items") as err:
        read_domain(csv_source(tmp_path), NO_KCORE)
    assert (err.value.file, err.value.field) == (str(tmp_path), "items")


def test_missing_recbole_item_file_names_the_path(tmp_path):
    write_lines(tmp_path / "x.inter", [tsv("user_id:token", "item_id:token"), tsv(1, 2)])
    with pytest.raises(DataError) as err:
        read_domain(DomainSource(name="r", format="recbole-atomic", path=str(tmp_path)), NO_KCORE)
    assert err.value.file == str(tmp_path / "x.item")


def test_missing_online_retail_table_names_the_path(tmp_path):
    source = DomainSource(name="r", format="online-retail", path=str(tmp_path / "retail.xlsx"))
    with pytest.raises(DataError, match="file not found"):
        read_domain(source, NO_KCORE)


def test_missing_csv_column_names_the_column_and_file(tmp_path):
    write_lines(tmp_path / "interactions.csv", ["user,item,timestamp", *GOOD_ROWS])
    write_lines(tmp_path / "items.csv", ["item,title", "a,A"])
    with pytest.raises(DataError, match="missing column") as err:
        read_domain(csv_source(tmp_path), NO_KCORE)
    assert (err.value.file, err.value.line, err.value.field) == (
        str(tmp_path / "items.csv"), 1, "text",
    )  # fmt: skip


def test_missing_parquet_column_names_the_column_and_file(tmp_path):
    pd.DataFrame({"user": ["u"], "item": ["a"]}).to_parquet(tmp_path / "interactions.parquet")
    write_lines(tmp_path / "items.csv", ["item,text", "a,A"])
    with pytest.raises(DataError, match="missing column") as err:
        read_domain(csv_source(tmp_path), NO_KCORE)
    assert err.value.field == "timestamp"
    assert err.value.file.endswith("interactions.parquet")


def test_missing_recbole_field_names_the_field(tmp_path):
    write_lines(tmp_path / "x.item", [tsv("item_id:token", "title:token_seq"), tsv(1, "One")])
    write_lines(tmp_path / "x.inter", [tsv("user_id:token", "item:token"), tsv(1, 1)])
    with pytest.raises(DataError, match="missing field") as err:
        read_domain(DomainSource(name="r", format="recbole-atomic", path=str(tmp_path)), NO_KCORE)
    assert (err.value.file, err.value.field) == (str(tmp_path / "x.inter"), "item_id")


# --- bad values: error by default, counted skip with on_bad_row=skip ----------------------


def test_unparsable_timestamp_names_line_and_field(tmp_path):
    write_csv_domain(tmp_path, ["u,a,1", "u,b,yesterday", "u,c,3"])
    with pytest.raises(DataError, match="yesterday") as err:
        read_domain(csv_source(tmp_path), NO_KCORE)
    assert (err.value.line, err.value.field) == (3, "timestamp")
    assert str(err.value).startswith(f"{tmp_path / 'interactions.csv'}:3: field 'timestamp'")


def test_timestamp_not_matching_the_strptime_format_is_an_error(tmp_path):
    write_csv_domain(tmp_path, ["u,a,2021-01-01", "u,b,01/02/2021"])
    with pytest.raises(DataError) as err:
        read_domain(csv_source(tmp_path, timestamp_format="%d/%m/%Y"), NO_KCORE)
    assert (err.value.line, err.value.field) == (2, "timestamp")


def test_skip_mode_counts_and_logs_bad_timestamps(tmp_path, caplog):
    write_csv_domain(tmp_path, ["u,a,1", "u,b,yesterday", "u,c,3", "u,a,4"])
    with caplog.at_level(logging.WARNING):
        domain = read_domain(csv_source(tmp_path, on_bad_row="skip"), NO_KCORE)
    assert domain.skipped == {"bad_timestamp": 1}
    assert [domain.item_keys[i - 1] for i in domain.sequences[0]] == ["a", "c", "a"]
    assert "bad_timestamp" in caplog.text and "interactions.csv:3" in caplog.text


def test_empty_item_text_names_line_and_field(tmp_path):
    write_csv_domain(tmp_path, GOOD_ROWS, items=["a,A", 'b,"  "', "c,C"])
    with pytest.raises(DataError, match="empty text") as err:
        read_domain(csv_source(tmp_path), NO_KCORE)
    assert (err.value.file, err.value.line, err.value.field) == (
        str(tmp_path / "items.csv"), 3, "text",
    )  # fmt: skip


def test_empty_recbole_text_names_line(tmp_path):
    write_lines(
        tmp_path / "x.item",
        [tsv("item_id:token", "title:token_seq"), tsv(1, "One"), tsv(2, " <br> ")],
    )
    write_lines(tmp_path / "x.inter", [tsv("user_id:token", "item_id:token"), tsv(1, 1)])
    with pytest.raises(DataError, match="empty") as err:
        read_domain(DomainSource(name="r", format="recbole-atomic", path=str(tmp_path)), NO_KCORE)
    assert (err.value.line, err.value.field) == (3, "title")


def test_interaction_on_an_item_without_text_is_an_error_for_csv(tmp_path):
    write_csv_domain(tmp_path, ["u,a,1", "u,b,2", "u,zzz,3"])
    with pytest.raises(DataError, match="'zzz' has no text") as err:
        read_domain(csv_source(tmp_path), NO_KCORE)
    assert (err.value.line, err.value.field) == (4, "item")


def test_interaction_on_an_item_without_text_is_counted_when_skipping(tmp_path):
    write_csv_domain(tmp_path, ["u,a,1", "u,b,2", "u,zzz,3", "u,c,4"])
    domain = read_domain(csv_source(tmp_path, on_bad_row="skip"), NO_KCORE)
    assert domain.skipped == {"unknown_item": 1}
    assert domain.item_keys == ["a", "b", "c"]


def test_duplicate_interactions_are_counted(tmp_path):
    write_csv_domain(tmp_path, ["u,a,1", "u,b,2", "u,a,1", "u,c,3"])
    domain = read_domain(csv_source(tmp_path), NO_KCORE)
    assert domain.skipped == {"duplicate": 1}
    assert domain.num_interactions == 3


def test_row_with_too_few_values_names_its_line(tmp_path):
    write_csv_domain(tmp_path, ["u,a,1", "u,b"])
    with pytest.raises(DataError, match="expected 3 values, got 2") as err:
        read_domain(csv_source(tmp_path), NO_KCORE)
    assert err.value.line == 3


def test_csv_line_numbers_count_quoted_newlines(tmp_path):
    write_lines(tmp_path / "items.csv", ["item,text", 'a,"two', 'lines"', "b,", "c,C"])
    write_lines(tmp_path / "interactions.csv", ["user,item,timestamp", *GOOD_ROWS])
    with pytest.raises(DataError, match="empty text") as err:
        read_domain(csv_source(tmp_path), NO_KCORE)
    assert err.value.line == 4


def test_recbole_line_with_wrong_number_of_values_names_its_line(tmp_path):
    write_lines(tmp_path / "x.item", [tsv("item_id:token", "title:token_seq"), tsv(1, "One")])
    write_lines(
        tmp_path / "x.inter",
        [tsv("user_id:token", "item_id:token", "timestamp:float"), tsv(1, 1, 5), tsv(1, 1)],
    )
    with pytest.raises(DataError, match="expected 3 tab-separated values") as err:
        read_domain(DomainSource(name="r", format="recbole-atomic", path=str(tmp_path)), NO_KCORE)
    assert (err.value.file, err.value.line) == (str(tmp_path / "x.inter"), 3)


# --- encodings ----------------------------------------------------------------------------


def test_non_utf8_csv_bytes_name_file_and_line(tmp_path):
    write_csv_domain(tmp_path, GOOD_ROWS)
    (tmp_path / "items.csv").write_bytes(b"item,text\na,A\nb,Caf\xe9 latin-1\nc,C\n")
    with pytest.raises(DataError, match="not valid UTF-8: byte 0xe9") as err:
        read_domain(csv_source(tmp_path), NO_KCORE)
    assert (err.value.file, err.value.line) == (str(tmp_path / "items.csv"), 3)


def test_non_utf8_bytes_in_gzip_reviews_name_the_line(tmp_path):
    with gzip.open(tmp_path / "Cat.json.gz", "wb") as fh:
        fh.write(b'{"reviewerID": "R", "asin": "A", "unixReviewTime": 1}\n')
        fh.write(b'{"reviewerID": "R\xff", "asin": "B", "unixReviewTime": 2}\n')
    write_lines(tmp_path / "meta_Cat.json", [json.dumps({"asin": "A", "title": "T"})])
    source = DomainSource(name="a", format="amazon-2018", path=str(tmp_path))
    with pytest.raises(DataError, match="UTF-8") as err:
        read_domain(source, NO_KCORE)
    assert (err.value.file, err.value.line) == (str(tmp_path / "Cat.json.gz"), 2)


# --- amazon-2018 ---------------------------------------------------------------------------


def write_amazon(directory: Path, review_lines: list[str]) -> DomainSource:
    write_lines(directory / "Cat.json", review_lines)
    write_lines(directory / "meta_Cat.json", [json.dumps({"asin": a, "title": a}) for a in "ABC"])
    return DomainSource(name="a", format="amazon-2018", path=str(directory))


def review(user: str, asin: str, time: object) -> str:
    return json.dumps({"reviewerID": user, "asin": asin, "unixReviewTime": time})


def test_amazon_invalid_json_names_the_line(tmp_path):
    source = write_amazon(tmp_path, [review("R", "A", 1), '{"reviewerID": "R", "asin": '])
    with pytest.raises(DataError, match="not valid JSON") as err:
        read_domain(source, NO_KCORE)
    assert err.value.line == 2


def test_amazon_review_without_time_names_the_field(tmp_path):
    source = write_amazon(
        tmp_path, [review("R", "A", 1), json.dumps({"reviewerID": "R", "asin": "B"})]
    )
    with pytest.raises(DataError) as err:
        read_domain(source, NO_KCORE)
    assert (err.value.line, err.value.field) == (2, "unixReviewTime")


def test_amazon_bad_reviews_are_counted_when_skipping(tmp_path):
    lines = [review("R", "A", 1), "not json", review("R", "B", "soon"), review("R", "B", 2)]
    source = write_amazon(tmp_path, [*lines, review("R", "C", 3)])
    source.on_bad_row = "skip"
    domain = read_domain(source, NO_KCORE)
    assert domain.skipped == {"bad_json": 1, "bad_timestamp": 1}
    assert domain.num_interactions == 3


def test_two_candidate_review_files_ask_for_the_option(tmp_path):
    write_amazon(tmp_path, [review("R", "A", 1)])
    write_lines(tmp_path / "Cat_5.json", [review("R", "A", 1)])
    with pytest.raises(DataError, match="Cat.json, Cat_5.json") as err:
        read_domain(DomainSource(name="a", format="amazon-2018", path=str(tmp_path)), NO_KCORE)
    assert err.value.field == "interactions"


# --- unisrec-atomic ------------------------------------------------------------------------

INTER_HEADER = tsv("user_id:token", "item_id_list:token_seq", "item_id:token")


def write_unisrec(directory: Path, train: list[str], valid: list[str], test: list[str]) -> None:
    """Items A B C D, users U0 U1; U0's sequence is A B C D, U1's is C B A."""
    write_lines(directory / "Toy.item2index", [tsv(k, i) for i, k in enumerate("ABCD")])
    write_lines(directory / "Toy.user2index", [tsv("U0", 0), tsv("U1", 1)])
    write_lines(directory / "Toy.text", [tsv("item_id:token", "text:token_seq")] + [tsv(k, k) for k in "ABCD"])  # fmt: skip
    write_lines(directory / "Toy.train.inter", [INTER_HEADER, *train])
    write_lines(directory / "Toy.valid.inter", [INTER_HEADER, *valid])
    write_lines(directory / "Toy.test.inter", [INTER_HEADER, *test])


GOOD_TRAIN = [tsv(0, "0", 1)]
GOOD_VALID = [tsv(0, "0 1", 2), tsv(1, "2", 1)]
GOOD_TEST = [tsv(0, "0 1 2", 3), tsv(1, "2 1", 0)]


def unisrec_source(directory: Path, **options) -> DomainSource:
    return DomainSource(name="toy", format="unisrec-atomic", path=str(directory), **options)


def test_unisrec_toy_files_are_consistent(tmp_path):
    write_unisrec(tmp_path, GOOD_TRAIN, GOOD_VALID, GOOD_TEST)
    domain = read_domain(unisrec_source(tmp_path), NO_KCORE)
    assert [s.tolist() for s in domain.sequences] == [[1, 2, 3, 4], [3, 2, 1]]


def test_unisrec_history_inconsistent_with_the_train_rows_names_file_and_line(tmp_path):
    write_unisrec(tmp_path, GOOD_TRAIN, GOOD_VALID, [tsv(0, "0 1 2", 3), tsv(1, "2 3", 0)])
    with pytest.raises(DataError, match="does not fit user 'U1'") as err:
        read_domain(unisrec_source(tmp_path), NO_KCORE)
    assert (err.value.file, err.value.line) == (str(tmp_path / "Toy.test.inter"), 3)


def test_unisrec_inconsistent_user_is_dropped_and_counted_when_skipping(tmp_path):
    write_unisrec(tmp_path, GOOD_TRAIN, [tsv(0, "0 3", 2), tsv(1, "2", 1)], GOOD_TEST)
    domain = read_domain(unisrec_source(tmp_path, on_bad_row="skip"), NO_KCORE)
    assert domain.user_keys == ["U1"]
    assert domain.skipped == {"inconsistent_user": 1}


def test_unisrec_user_without_a_test_row_is_an_error(tmp_path):
    write_unisrec(tmp_path, GOOD_TRAIN, GOOD_VALID, GOOD_TEST[:1])
    with pytest.raises(DataError, match="user 'U1' has 0 test rows") as err:
        read_domain(unisrec_source(tmp_path), NO_KCORE)
    assert err.value.field == "user_id"


def test_unisrec_item_index_out_of_range_names_line_and_field(tmp_path):
    write_unisrec(tmp_path, [tsv(0, "0 9", 1)], GOOD_VALID, GOOD_TEST)
    with pytest.raises(DataError, match="'9' is not an index below 4") as err:
        read_domain(unisrec_source(tmp_path), NO_KCORE)
    assert (err.value.line, err.value.field) == (2, "item_id_list")


def test_unisrec_item_without_text_is_an_error(tmp_path):
    write_unisrec(tmp_path, GOOD_TRAIN, GOOD_VALID, GOOD_TEST)
    write_lines(tmp_path / "Toy.text", [tsv("item_id:token", "text:token_seq"), tsv("A", "A")])
    with pytest.raises(DataError, match="'B' has no text") as err:
        read_domain(unisrec_source(tmp_path), NO_KCORE)
    assert (err.value.file, err.value.line) == (str(tmp_path / "Toy.item2index"), 2)


def test_unisrec_textless_item_drops_its_users_and_closes_the_index_when_skipping(tmp_path):
    write_unisrec(tmp_path, GOOD_TRAIN, GOOD_VALID, GOOD_TEST)
    write_lines(
        tmp_path / "Toy.text",
        [tsv("item_id:token", "text:token_seq")] + [tsv(k, k) for k in "ABC"],
    )
    domain = read_domain(unisrec_source(tmp_path, on_bad_row="skip"), NO_KCORE)
    assert domain.item_keys == ["A", "B", "C"]
    assert domain.user_keys == ["U1"]
    assert [s.tolist() for s in domain.sequences] == [[3, 2, 1]]
    assert domain.skipped == {"item_without_text": 1, "user_with_textless_item": 1}


def test_unisrec_index_with_a_gap_is_an_error(tmp_path):
    write_unisrec(tmp_path, GOOD_TRAIN, GOOD_VALID, GOOD_TEST)
    write_lines(tmp_path / "Toy.item2index", [tsv("A", 0), tsv("B", 1), tsv("C", 3)])
    with pytest.raises(DataError, match="2 is missing") as err:
        read_domain(unisrec_source(tmp_path), NO_KCORE)
    assert err.value.field == "index"


# --- online-retail ------------------------------------------------------------------------


def test_corrupt_xlsx_is_a_data_error(tmp_path):
    (tmp_path / "retail.xlsx").write_bytes(b"this is not a zip archive")
    source = DomainSource(name="r", format="online-retail", path=str(tmp_path / "retail.xlsx"))
    with pytest.raises(DataError, match="unreadable xlsx") as err:
        read_domain(source, NO_KCORE)
    assert err.value.file == str(tmp_path / "retail.xlsx")


def test_online_retail_bad_invoice_date_names_row_and_field(tmp_path):
    write_lines(
        tmp_path / "retail.csv",
        [
            "InvoiceNo,StockCode,Description,Quantity,InvoiceDate",
            "1,A,thing a,1,12/1/2010 8:26",
            "1,B,thing b,1,someday",
        ],
    )
    source = DomainSource(name="r", format="online-retail", path=str(tmp_path / "retail.csv"))
    with pytest.raises(DataError, match="someday") as err:
        read_domain(source, NO_KCORE)
    assert (err.value.line, err.value.field) == (3, "InvoiceDate")
