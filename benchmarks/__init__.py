"""Speed and memory of ``lpjepa`` against the seed's reference.

``cases`` builds the work (operation x shape x provider), ``measure`` times it and
reads its memory peak, ``report`` is the one-command report
(``python -m benchmarks.report``) and ``test_speed`` the pytest-benchmark suite
(``pytest benchmarks/ --benchmark-only``). ``directions`` is the variance study of the
direction schemes (``python -m benchmarks.directions``). This package imports ``lpjepa``;
the library never imports it.
"""
