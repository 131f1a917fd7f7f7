"""The CLI's shared CSV output: one header, formula cells inert, nothing for no rows."""

import csv
import io

from clipxfer.cli.common import emit_csv
from clipxfer.csvcells import cell_text


def test_emit_csv_writes_a_header_and_inert_formula_cells(capsys):
    emit_csv([{"path": "=HYPERLINK(\"http://evil.example\")", "score": 0.5}, {"path": "b.png", "score": 1.25}])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["path"] for row in rows] == ["'=HYPERLINK(\"http://evil.example\")", "b.png"]
    assert cell_text(rows[0]["path"]) == "=HYPERLINK(\"http://evil.example\")"
    assert [float(row["score"]) for row in rows] == [0.5, 1.25]


def test_emit_csv_of_no_rows_prints_nothing(capsys):
    emit_csv([])
    assert capsys.readouterr().out == ""
