"""The child process of tests/test_input_path.py's page-fault test (not collected by pytest).

A spawned child imports the module of its target: this one imports nothing but the standard library,
so the child pays for the token ring it is sent (nearid.tokens) and not for the test module's imports.
"""

import resource


def write_faults(control, mapped, results) -> None:
    """Minor page faults of writing every buffer of two rings of one size: `control` as it comes, `mapped`
    after `TokenRing.prefault`; put on `results` as {prefaulted: faults}."""
    results.put({False: _faults_writing(control), True: _faults_writing(mapped, prefault=True)})


def _faults_writing(ring, prefault: bool = False) -> int:
    if prefault:
        assert ring.prefault()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for tensor in ring.buffers.values():
        tensor.numpy().fill(1)  # numpy: no OpenMP pool, which a forked child of a process that used one lacks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
