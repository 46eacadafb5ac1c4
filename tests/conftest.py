import importlib
import itertools
import os
import time

import pytest
import zmq

from gatekeeper import _fast_py

try:
    from gatekeeper import _fast
except ImportError:  # the extension-loaded test reports this; the rest runs on the twin
    _fast = None

IMPLS = [
    pytest.param(_fast, id="c", marks=pytest.mark.skipif(_fast is None, reason="no extension")),
    pytest.param(_fast_py, id="py"),
]
if os.environ.get("GATEKEEPER_NO_EXTENSIONS"):
    IMPLS = IMPLS[1:]

# Frontend engines a gatekeeper process is run with: the native one wherever it is built.
ENGINES = ["libzmq"]
if _fast is not None and not os.environ.get("GATEKEEPER_NO_EXTENSIONS"):
    try:
        from gatekeeper import _native  # noqa: F401
    except ImportError:
        pass
    else:
        ENGINES.insert(0, "native")

# The gatekeepers a test runs: (frontend engine, backend engine) for every pairing that
# exists, the default first. The native DEALER runs in the native frontend's loop only, so
# the libzmq frontend has its libzmq DEALER alone; each frontend's own backend engine bears
# its name. A test id names the frontend engine, and the backend engine where it is not the
# frontend's own: `native`, `native+libzmq-backend`, `libzmq`.
GATEKEEPERS = [(e, b) for e in ENGINES for b in (["native", "libzmq"] if e == "native" else [e])]

# GATEKEEPER_TEST_BACKENDS (comma-separated: native, libzmq) keeps only the backend engines
# it names wherever a frontend engine has the choice: `native` runs each frontend on its own
# backend alone. A frontend with none of them keeps its own, so the frontend matrix stays.
if os.environ.get("GATEKEEPER_TEST_BACKENDS"):
    _wanted = os.environ["GATEKEEPER_TEST_BACKENDS"].split(",")
    if not set(_wanted) <= {"native", "libzmq"}:
        raise ValueError(f"GATEKEEPER_TEST_BACKENDS={','.join(_wanted)}: native, libzmq")
    GATEKEEPERS = [(e, b) for e, b in GATEKEEPERS
                   if b in _wanted or b == e and not any(
                       e2 == e and b2 in _wanted for e2, b2 in GATEKEEPERS)]


def gatekeeper_id(frontend: str, backend: str) -> str:
    return frontend if backend == frontend else f"{frontend}+{backend}-backend"


def pytest_generate_tests(metafunc):
    """Every test that runs a gatekeeper (the `engine` fixture, through
    `gatekeeper_factory`) runs once per pairing in GATEKEEPERS, or on those its markers
    leave: `@pytest.mark.engines(...)` names frontend engines, `@pytest.mark.backends(...)`
    backend engines, "default" the first of each built; `backends("own")` runs each
    frontend engine on its own backend engine alone."""
    if "gatekeeper_engines" in metafunc.fixturenames:
        pairs = gatekeepers_for(metafunc.definition.get_closest_marker("engines"),
                                metafunc.definition.get_closest_marker("backends"))
        metafunc.parametrize("gatekeeper_engines", pairs,
                             ids=[gatekeeper_id(*pair) for pair in pairs])


def gatekeepers_for(engines, backends) -> list[tuple[str, str]]:
    """The pairings that markers `engines` and `backends` (either None) leave."""
    if engines is not None and backends is None and engines.args == ("default",):
        return GATEKEEPERS[:1]  # a test about neither engine: the default gatekeeper once
    default_frontend, default_backend = GATEKEEPERS[0]
    frontends = [default_frontend if name == "default" else name
                 for name in (engines.args if engines else ENGINES)]
    if backends is not None and backends.args == ("own",):
        return [(e, b) for e, b in GATEKEEPERS if e in frontends and b == e]
    backends = [default_backend if name == "default" else name
                for name in (backends.args if backends else ["native", "libzmq"])]
    return [(e, b) for e, b in GATEKEEPERS if e in frontends and b in backends]


def pytest_collection_modifyitems(config, items):
    # The pure-Python twin has no native engine: such a pairing would only repeat the
    # libzmq one.
    # (A test whose markers leave no pairing here has a placeholder, not a pair, and skips.)
    twin_native = [i for i in items if getattr(i, "callspec", None) is not None
                   and isinstance(pair := i.callspec.params.get("gatekeeper_engines"), tuple)
                   and pair[0] == "native" and i.callspec.params.get("twin") is True]
    if twin_native:
        config.hook.pytest_deselected(items=twin_native)
        items[:] = [i for i in items if i not in twin_native]


@pytest.fixture(params=IMPLS)
def impl(request):
    """The data-plane module under test: the compiled one (`c`) or its twin (`py`)."""
    return request.param


_ports = itertools.count(0)


@pytest.fixture
def endpoint_factory(tmp_path):
    """Fresh endpoints of one transport: `make(transport, name)`."""

    def make(transport: str, name: str) -> str:
        if transport == "inproc":
            return f"inproc://{name}-{next(_ports)}-{time.monotonic_ns()}"
        if transport == "ipc":
            return f"ipc://{tmp_path}/{name}-{next(_ports)}.sock"
        return "tcp://127.0.0.1:*"

    return make


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def peers(ctx):
    """Client sockets that watch their own handshake (handshake.Peers), closed afterwards."""
    from handshake import Peers

    p = Peers(ctx)
    yield p
    p.close()


@pytest.fixture
def echo_broker_factory():
    """`make(endpoint, bind=True, delay=0.0)`: an echo broker, replying `delay` seconds late."""
    from harness import EchoBroker, SlowEchoBroker

    brokers = []

    def make(endpoint, bind=True, delay=0.0):
        broker = SlowEchoBroker(endpoint, delay, bind) if delay else EchoBroker(endpoint, bind)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.close()


@pytest.fixture
def gatekeeper_engines():
    """(frontend engine, backend engine) under test (see pytest_generate_tests)."""
    return GATEKEEPERS[0]


@pytest.fixture
def engine(gatekeeper_engines):
    """The frontend engine under test: `native` or `libzmq`."""
    return gatekeeper_engines[0]


@pytest.fixture
def backend_engine(gatekeeper_engines):
    """The backend engine under test: `native` (the native DEALER) or `libzmq`."""
    return gatekeeper_engines[1]


@pytest.fixture
def all_gatekeepers():
    """Every (frontend engine, backend engine) pairing this run covers, for a test that
    runs them all itself."""
    return list(GATEKEEPERS)


@pytest.fixture
def redis_factory(tmp_path):
    """`make(unix=False, password=None)`: a real redis-server of the test's own, stopped
    afterwards (SIGCONT first, should the test have paused it)."""
    from redis_server import RedisServer

    servers = []

    def make(**kwargs):
        workdir = tmp_path / f"redis{len(servers)}"
        workdir.mkdir()
        servers.append(RedisServer(workdir, **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def gatekeeper_factory(tmp_path, echo_broker_factory, engine, backend_engine):
    """`make(extra_toml, broker=True, python_twin=False, metrics=False, brokers=1,
    brokers_connect=False)`: an echo broker and a running gatekeeper CLI process in front
    of it (connected to `brokers` endpoints, `gk.backends`, or bound there with
    `brokers_connect`; the broker is on the first), on the `engine` and `backend_engine`
    under test; both stopped afterwards."""
    from harness import GatekeeperProcess

    procs = []

    def make(extra="", *, broker=True, python_twin=False, metrics=False, start=True,
             brokers=1, brokers_connect=False):
        workdir = tmp_path / f"gk{len(procs)}"
        workdir.mkdir()
        gk = GatekeeperProcess(workdir, extra, python_twin=python_twin, metrics=metrics,
                               engine="libzmq" if python_twin else engine,
                               backend_engine="libzmq" if python_twin else backend_engine,
                               brokers=brokers, brokers_connect=brokers_connect)
        procs.append(gk)
        if broker:
            gk.broker = echo_broker_factory(gk.backend)
        if start:
            gk.start()
        return gk

    yield make
    for gk in procs:
        gk.stop()


def pytest_configure(config):
    # CI runs the suite against the installed wheel; it must not pick up the source tree.
    if os.environ.get("GATEKEEPER_EXPECT_INSTALLED"):
        import gatekeeper

        assert "site-packages" in gatekeeper.__file__, gatekeeper.__file__


@pytest.fixture
def refused(engine):
    """What a refused client's monitor reports: libzmq's ZAP refusal fails the handshake
    as an authentication failure; the native engine closes at accept, before a byte."""
    from handshake import FAILED_AUTH, FAILED_NO_DETAIL

    return FAILED_AUTH if engine == "libzmq" else FAILED_NO_DETAIL
