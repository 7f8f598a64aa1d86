"""The catalogue of bad inputs: each area's cases live in its own module here.

``tests/test_bad_inputs.py`` runs every case through the real ``slimforge`` entry point
and checks the contract: the documented exit code, exactly one ``slimforge: error:`` line
that matches what went wrong, no traceback on the console, and (where a case says so)
nothing lost. ``pytest tests/test_bad_inputs.py -q`` prints the catalogue's size.
"""
