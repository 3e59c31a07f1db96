"""The runner: the only package that imports Ray (lazily, inside the functions that need it).

``layout`` (where files live), ``connect`` (joining or starting Ray), ``resources``
(what each stage reserves), ``adapter`` (stage objects as Ray actors), the phases
``candidates`` -> ``dedup`` -> ``score`` -> ``publish``, and ``run`` tying them together.
"""
