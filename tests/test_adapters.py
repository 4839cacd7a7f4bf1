"""Each ingestion format read from small files written here, plus the real data sets."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from sharding.config import DomainSource, ProcessingConfig
from sharding.readers import read_domain
from sharding.readers.amazon2018 import item_text

NO_KCORE = ProcessingConfig(kcore=0)
DATA = Path(os.environ.get("UNISREC_DATA_ROOT", "/work/shared/data"))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def tsv(*values: object) -> str:
    return "\t".join(str(v) for v in values)


def as_lists(domain) -> dict[str, list[str]]:
    """user key -> item keys in sequence order."""
    return {
        user: [domain.item_keys[i - 1] for i in seq]
        for user, seq in zip(domain.user_keys, domain.sequences, strict=True)
    }


# --- unisrec-atomic -----------------------------------------------------------------------

INTER_HEADER = tsv("user_id:token", "item_id_list:token_seq", "item_id:token")


def write_unisrec(directory: Path, train: list[str] | None = None) -> Path:
    """Items A..D (index 0..3); histories cut to the last 2 items.

    user U0: A B C D A   train rows listed longest first, as the released files do
    user U1: D C B       no train row at all: starts from the valid history
    user U2: B C D A A   train rows listed shortest first
    """
    directory.mkdir(exist_ok=True)
    write_lines(directory / "Toy.item2index", [tsv(k, i) for i, k in enumerate("ABCD")])
    write_lines(directory / "Toy.user2index", [tsv("U0", 0), tsv("U1", 1), tsv("U2", 2)])
    texts = ["Alpha &amp; one. ", "Beta. ", "Gamma <b>bold</b>. ", "Delta. "]
    write_lines(
        directory / "Toy.text",
        [tsv("item_id:token", "text:token_seq")]
        + [tsv(k, t) for k, t in zip("ABCD", texts, strict=True)],
    )
    default_train = [tsv(0, "0 1", 2), tsv(0, "0", 1), tsv(2, "1", 2), tsv(2, "1 2", 3)]
    write_lines(directory / "Toy.train.inter", [INTER_HEADER] + (train or default_train))
    write_lines(directory / "Toy.valid.inter", [INTER_HEADER, tsv(0, "1 2", 3), tsv(1, "3", 2), tsv(2, "2 3", 0)])  # fmt: skip
    write_lines(directory / "Toy.test.inter", [INTER_HEADER, tsv(0, "2 3", 0), tsv(1, "3 2", 1), tsv(2, "3 0", 0)])  # fmt: skip
    return directory


def unisrec_source(directory: Path, **options) -> DomainSource:
    return DomainSource(name="toy", format="unisrec-atomic", path=str(directory), **options)


def test_unisrec_atomic_rebuilds_whole_sequences_from_cut_histories(tmp_path):
    domain = read_domain(unisrec_source(write_unisrec(tmp_path / "toy")), NO_KCORE)
    assert domain.item_keys == ["A", "B", "C", "D"]  # local index = item2index + 1
    assert domain.user_keys == ["U0", "U1", "U2"]
    assert [s.tolist() for s in domain.sequences] == [[1, 2, 3, 4, 1], [4, 3, 2], [2, 3, 4, 1, 1]]
    assert domain.item_texts == ["Alpha & one.", "Beta.", "Gamma bold.", "Delta."]
    assert domain.skipped == {}


def test_unisrec_atomic_cuts_texts_to_max_text_chars(tmp_path):
    cfg = ProcessingConfig(max_text_chars=6)
    domain = read_domain(unisrec_source(write_unisrec(tmp_path / "toy")), cfg)
    assert domain.item_texts[0] == "Alpha"


def test_unisrec_atomic_keeps_the_given_split_without_kcore(tmp_path):
    # kcore=5 would drop every user of this toy set; the given split is kept instead.
    domain = read_domain(unisrec_source(write_unisrec(tmp_path / "toy")), ProcessingConfig(kcore=5))
    assert len(domain.user_keys) == 3


# --- recbole-atomic -----------------------------------------------------------------------


def write_recbole(directory: Path) -> Path:
    directory.mkdir(exist_ok=True)
    write_lines(
        directory / "mini.item",
        [
            tsv("item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"),
            tsv(1, "Toy Story", 1995, "Animation Comedy"),
            tsv(2, "Heat", 1995, "Action Crime"),
            tsv(3, "Fargo", 1996, ""),
        ],
    )
    write_lines(
        directory / "mini.inter",
        [
            tsv("user_id:token", "item_id:token", "rating:float", "timestamp:float"),
            tsv(10, 2, 4, 300), tsv(10, 1, 5, 100), tsv(10, 3, 3, 200),
            tsv(20, 3, 2, 50), tsv(20, 1, 1, 50), tsv(20, 2, 5, 10),
        ],
    )  # fmt: skip
    return directory


def test_recbole_atomic_orders_by_timestamp_and_joins_token_seq_fields(tmp_path):
    source = DomainSource(name="ml", format="recbole-atomic", path=str(write_recbole(tmp_path)))
    domain = read_domain(source, NO_KCORE)
    assert as_lists(domain) == {"10": ["1", "3", "2"], "20": ["2", "3", "1"]}
    assert domain.item_texts == ["Toy Story. Animation Comedy", "Heat. Action Crime", "Fargo"]


def test_recbole_atomic_text_fields_choose_the_text(tmp_path):
    source = DomainSource(
        name="ml",
        format="recbole-atomic",
        path=str(write_recbole(tmp_path)),
        dataset="mini",
        text_fields=["movie_title", "release_year"],
    )
    assert read_domain(source, NO_KCORE).item_texts[0] == "Toy Story. 1995"


# --- csv ----------------------------------------------------------------------------------


def test_csv_reads_iso_times_and_mapped_columns(tmp_path):
    write_lines(
        tmp_path / "interactions.csv",
        [
            "uid,asin,when",
            "u1,i2,2020-01-03T00:00:00",
            "u1,i1,2020-01-01T00:00:00Z",
            "u1,i3,2020-01-02 12:00:00+00:00",
        ],
    )
    write_lines(tmp_path / "items.csv", ["asin,text", 'i1,"One, with comma"', "i2,Two", "i3,Three"])
    source = DomainSource(
        name="c",
        format="csv",
        path=str(tmp_path),
        columns={"user": "uid", "item": "asin", "timestamp": "when"},
    )
    domain = read_domain(source, NO_KCORE)
    assert as_lists(domain) == {"u1": ["i1", "i3", "i2"]}
    assert domain.item_texts[0] == "One, with comma"


def test_csv_reads_strptime_times(tmp_path):
    write_lines(
        tmp_path / "events.csv",
        ["user,item,timestamp", "u,b,02/01/2021", "u,a,01/01/2021", "u,c,15/01/2021"],
    )
    write_lines(tmp_path / "texts.csv", ["item,text", "a,A", "b,B", "c,C"])
    source = DomainSource(
        name="c",
        format="csv",
        path=str(tmp_path),
        interactions="events.csv",
        items="texts.csv",
        timestamp_format="%d/%m/%Y",
    )
    assert as_lists(read_domain(source, NO_KCORE)) == {"u": ["a", "b", "c"]}


def test_csv_reads_parquet_tables_with_numeric_times(tmp_path):
    pd.DataFrame(
        {"user": ["u", "u", "u", "v"], "item": ["b", "a", "c", "a"], "timestamp": [20, 10, 30, 5]}
    ).to_parquet(tmp_path / "interactions.parquet")
    pd.DataFrame({"item": ["a", "b", "c"], "text": ["A", "B", "C"]}).to_parquet(
        tmp_path / "items.parquet"
    )
    source = DomainSource(name="p", format="csv", path=str(tmp_path))
    assert as_lists(read_domain(source, NO_KCORE)) == {"u": ["a", "b", "c"]}


# --- amazon-2018 --------------------------------------------------------------------------


def test_amazon_item_text_follows_the_unisrec_layout():
    meta = {
        "asin": "B1",
        "title": "Sanding Roll...",
        "category": ["Industrial & Scientific", "Abrasive Products"],
        "brand": "PORTER-CABLE",
    }
    assert (
        item_text(meta) == "Sanding Roll. Industrial & Scientific Abrasive Products. PORTER-CABLE."
    )
    assert item_text({"asin": "B2", "title": "Only title"}) == "Only title."
    assert item_text({"asin": "B3", "brand": "No title"}) == ""


def write_amazon(directory: Path) -> Path:
    directory.mkdir(exist_ok=True)
    reviews = [
        {"reviewerID": "R1", "asin": "B2", "unixReviewTime": 300, "overall": 5.0},
        {"reviewerID": "R1", "asin": "B1", "unixReviewTime": 100},
        {"reviewerID": "R1", "asin": "B3", "unixReviewTime": 200},
        {"reviewerID": "R1", "asin": "B9", "unixReviewTime": 400},  # no metadata
        {"reviewerID": "R1", "asin": "B4", "unixReviewTime": 500},  # metadata without title
    ]
    with gzip.open(directory / "Tools.json.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in reviews)
    meta = [
        {"asin": "B1", "title": "Drill", "category": ["Tools", "Power"], "brand": "Acme"},
        {"asin": "B2", "title": "Saw &amp; blade", "brand": "Acme"},
        {"asin": "B3", "title": "Glue", "category": []},
        {"asin": "B4", "category": ["Tools"]},
        {"asin": "B1", "title": "Duplicate record, ignored"},
    ]
    write_lines(directory / "meta_Tools.json", [json.dumps(m) for m in meta])
    return directory


def test_amazon_2018_streams_gzip_reviews_and_drops_items_without_title(tmp_path):
    source = DomainSource(name="tools", format="amazon-2018", path=str(write_amazon(tmp_path)))
    domain = read_domain(source, NO_KCORE)
    assert as_lists(domain) == {"R1": ["B1", "B3", "B2"]}
    assert domain.item_texts == ["Drill. Tools Power. Acme.", "Saw & blade. Acme.", "Glue."]
    assert domain.skipped == {"item_without_title": 1, "item_without_text": 2}


# --- online-retail ------------------------------------------------------------------------

RETAIL_HEADER = [
    "InvoiceNo", "StockCode", "Description", "Quantity",
    "InvoiceDate", "UnitPrice", "CustomerID", "Country",
]  # fmt: skip


def retail_rows() -> list[list[object]]:
    return [
        ["536365", "85123A", "WHITE HANGING HEART", 6, "12/1/2010 8:26", 2.55, 17850, "UK"],
        ["536365", "71053", "WHITE METAL LANTERN", 6, "12/1/2010 8:26", 3.39, 17850, "UK"],
        ["536365", "84406B", "CREAM CUPID HEARTS", 8, "12/1/2010 8:26", 2.75, 17850, "UK"],
        ["536366", "71053", "white metal lantern ", 2, "12/1/2010 8:28", 3.39, 17851, "UK"],
        ["536366", "84406B", None, 1, "12/1/2010 8:28", 2.75, 17851, "UK"],
        ["536366", "85123A", "Heart, white hanging", 6, "12/1/2010 8:28", 2.55, 17851, "UK"],
        ["536366", "85123A", "WHITE HANGING HEART", 6, "12/1/2010 8:29", 2.55, 17851, "UK"],
        ["C536367", "71053", "WHITE METAL LANTERN", -1, "12/1/2010 9:00", 3.39, 17850, "UK"],
    ]


def check_retail(domain) -> None:
    # Lines of one invoice share a time, so their order is shuffled: compare them sorted.
    assert {user: sorted(items) for user, items in as_lists(domain).items()} == {
        "536365": ["71053", "84406B", "85123A"],
        "536366": ["71053", "85123A", "85123A"],
    }  # the cancellation C536367 is kept, but with one line it is too short to stay
    assert as_lists(domain)["536366"][-1] == "85123A"  # 8:29, after the 8:28 lines
    assert domain.item_texts == [
        "white metal lantern.", "cream cupid hearts.", "white hanging heart.",
    ]  # fmt: skip
    assert domain.skipped == {"missing_description": 1}


def test_online_retail_reads_invoices_from_xlsx(tmp_path):
    from openpyxl import Workbook

    workbook = Workbook()
    sheet = workbook.active
    sheet.append(RETAIL_HEADER)
    for row in retail_rows():
        row[4] = pd.Timestamp(pd.to_datetime(row[4], format="%m/%d/%Y %H:%M")).to_pydatetime()
        sheet.append(row)
    workbook.save(tmp_path / "retail.xlsx")
    source = DomainSource(name="r", format="online-retail", path=str(tmp_path / "retail.xlsx"))
    check_retail(read_domain(source, NO_KCORE))


def test_online_retail_reads_the_uci_csv_export(tmp_path):
    table = pd.DataFrame(retail_rows(), columns=RETAIL_HEADER)
    table.to_csv(tmp_path / "retail.csv", index=False)
    source = DomainSource(name="r", format="online-retail", path=str(tmp_path / "retail.csv"))
    check_retail(read_domain(source, NO_KCORE))


def paper_rule_rows() -> list[list[object]]:
    """A table that exercises each of the paper's Online Retail rules once.

    Items I1..I5 are on every invoice below; X only on 536371, which falls to the 5-core
    only in its second round (X goes first, then 536371 has 4 items).
    """
    names = {
        "I1": "Heart, white hanging", "I2": "WHITE METAL LANTERN", "I3": "CREAM CUPID HEARTS",
        "I4": "KNITTED UNION FLAG", "I5": "RED WOOLLY HOTTIE", "X": "LONE ITEM",
    }  # fmt: skip
    rows = []

    def line(invoice, code, time, quantity=1, description=None, customer=17850):
        text = names[code] if description is None else description
        rows.append([invoice, code, text, quantity, f"12/1/2010 {time}", 2.5, customer, "UK"])

    # I1's first line has no description (dropped); its first description is the next one,
    # although a later one is more frequent.
    line("536365", "I1", "8:26", 6, description="")
    line("536365", "I1", "8:26", 6, description="  WHITE HANGING HEART ")
    for code in ("I2", "I3", "I4", "I5"):
        line("536365", code, "8:26")
    for code in ("I1", "I2", "I3", "I4", "I5"):  # same customer, another invoice: a new user
        line("536366", code, "8:28")
    for code in ("I1", "I2", "I2", "I3", "I4", "I5"):  # I2 twice, identical: one interaction
        line("536367", code, "9:01", customer=17851)
    line("536368", "I3", "9:02", 1)
    line("536368", "I3", "9:02", 2)  # another quantity: a second interaction
    for code in ("I1", "I2", "I4", "I5"):
        line("536368", code, "9:02")
    for code in ("I1", "I2", "I3", "I4", "I5"):
        line("536369", code, "9:05")
    for code in ("I1", "I2", "I3", "I4", "I5"):  # a cancellation is a user like any other
        line("C536370", code, "9:10", -1)
    for code in ("I1", "I2", "I3", "I4", "X"):
        line("536371", code, "9:20")
    return rows


def write_retail_csv(path: Path, rows: list[list[object]]) -> Path:
    pd.DataFrame(rows, columns=RETAIL_HEADER).to_csv(path, index=False)
    return path


def test_online_retail_follows_the_papers_rules_by_default(tmp_path):
    path = write_retail_csv(tmp_path / "retail.csv", paper_rule_rows())
    source = DomainSource(name="r", format="online-retail", path=str(path), tie_order="file")
    domain = read_domain(source, ProcessingConfig())  # 5-core, as the paper
    assert as_lists(domain) == {
        "536365": ["I1", "I2", "I3", "I4", "I5"],
        "536366": ["I1", "I2", "I3", "I4", "I5"],
        "536367": ["I1", "I2", "I3", "I4", "I5"],
        "536368": ["I3", "I3", "I1", "I2", "I4", "I5"],
        "536369": ["I1", "I2", "I3", "I4", "I5"],
        "C536370": ["I1", "I2", "I3", "I4", "I5"],
    }
    assert domain.item_texts == [
        "white hanging heart.", "white metal lantern.", "cream cupid hearts.",
        "knitted union flag.", "red woolly hottie.",
    ]  # fmt: skip
    assert domain.skipped == {"missing_description": 1, "duplicate": 1}
    assert domain.num_interactions == 31


def test_online_retail_can_still_drop_cancellations(tmp_path):
    path = write_retail_csv(tmp_path / "retail.csv", paper_rule_rows())
    source = DomainSource(name="r", format="online-retail", path=str(path), drop_cancellations=True)
    domain = read_domain(source, ProcessingConfig())
    assert "C536370" not in domain.user_keys
    assert len(domain.user_keys) == 5
    assert domain.skipped == {"cancellation": 5, "missing_description": 1, "duplicate": 1}


def test_tie_order_defaults_to_shuffle_for_online_retail_and_file_elsewhere(tmp_path):
    path = write_retail_csv(tmp_path / "retail.csv", paper_rule_rows())
    retail = DomainSource(name="r", format="online-retail", path=str(path))
    assert read_domain(retail, ProcessingConfig(seed=4)).ties == {
        "order": "shuffle", "seed": 4, "groups": 6, "interactions": 31,
    }  # fmt: skip
    as_file = read_domain(retail, ProcessingConfig(tie_order="file")).ties
    assert as_file == {"order": "file", "seed": None, "groups": 6, "interactions": 31}

    write_lines(tmp_path / "interactions.csv", ["user,item,timestamp", "u,b,1", "u,a,1", "u,c,2"])
    write_lines(tmp_path / "items.csv", ["item,text", "a,A", "b,B", "c,C"])
    table = DomainSource(name="c", format="csv", path=str(tmp_path))
    assert read_domain(table, NO_KCORE).ties == {
        "order": "file", "seed": None, "groups": 1, "interactions": 2,
    }  # fmt: skip
    table.tie_order = "shuffle"  # a domain's own setting wins over processing's
    assert (
        read_domain(table, ProcessingConfig(kcore=0, tie_order="file")).ties["order"] == "shuffle"
    )
    assert read_domain(unisrec_source(write_unisrec(tmp_path / "u")), NO_KCORE).ties is None


# --- real data (skipped where /work/shared/data is absent) ---------------------------------


@pytest.mark.skipif(not (DATA / "amazon-scientific").exists(), reason="real data not present")
def test_real_scientific_gives_the_published_counts():
    source = DomainSource(
        name="scientific", format="unisrec-atomic", path=str(DATA / "amazon-scientific")
    )
    domain = read_domain(source, ProcessingConfig())
    assert (len(domain.user_keys), len(domain.item_keys)) == (8442, 4385)
    assert domain.num_interactions == 59427
    assert all(domain.item_texts)


@pytest.mark.skipif(not (DATA / "amazon-office-2014").exists(), reason="real data not present")
def test_real_office_after_5core():
    source = DomainSource(
        name="office",
        format="csv",
        path=str(DATA / "amazon-office-2014"),
        columns={"user": "user_id", "item": "item_id"},
    )
    domain = read_domain(source, ProcessingConfig(kcore=5))
    assert (len(domain.user_keys), len(domain.item_keys)) == (4905, 2420)
    assert domain.num_interactions == 53258


@pytest.mark.skipif(not (DATA / "movielens-100k").exists(), reason="real data not present")
def test_real_movielens_keeps_all_943_users_after_5core():
    source = DomainSource(name="ml", format="recbole-atomic", path=str(DATA / "movielens-100k"))
    domain = read_domain(source, ProcessingConfig(kcore=5))
    assert len(domain.user_keys) == 943
    assert domain.item_texts[0] == "Toy Story. Animation Children's Comedy"
