"""Several service hosts on one PostgreSQL: three gunicorns, each in a network namespace of its
own that reaches the database over a veth link, with nginx in front as the load balancer.
Traffic goes only to 127.0.0.1 and to the addresses of the namespaces made here."""

import os
import random
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from support.databases import Backend, assert_all_acknowledged_present
from support.load import WriteLoad, run_writers_and_a_consumer
from support.postgres_cluster import PostgresCluster
from support.servers import Gunicorn, Nginx
from support.service import AUTH

from customers_service.backends.postgres import schema as pg_schema

# Network namespaces (root), gunicorns, nginx and the PostgreSQL cluster they share.
pytestmark = [pytest.mark.system, pytest.mark.postgres]

HOSTS = 3


def ip(*args: str) -> None:
    """One iproute2 command, as root; a clear failure if the machine does not allow it."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.fail(f"ip {' '.join(args)}: {result.stderr.strip()} (root and iproute2 needed)")


def unused_subnet() -> str:
    """A 10.X prefix that no address or route of this machine uses (Docker, a VPN, ...)."""
    words = " ".join(
        subprocess.run(["ip", "-4", *args], capture_output=True, text=True, timeout=30).stdout
        for args in (("addr",), ("route",))
    ).split()
    for offset in range(150):
        prefix = f"10.{100 + (os.getpid() + offset) % 150}."
        if not any(word.startswith(prefix) for word in words):
            return prefix[:-1]
    pytest.fail("no free 10.X.0.0/16 for the test hosts")


class NetworkHost:
    """A network namespace joined to this one by a veth pair: 10.X.N.1 here, 10.X.N.2 there,
    and the database at 10.X.N.3 here, so that a test can cut the host off from the database
    alone."""

    def __init__(self, subnet: str, number: int):
        tag = f"{os.getpid() % 100000}"
        self.namespace = f"cs{tag}h{number}"
        self.outside, self.inside = f"cs{tag}o{number}", f"cs{tag}i{number}"
        self.gateway, self.address = f"{subnet}.{number}.1", f"{subnet}.{number}.2"
        self.database = f"{subnet}.{number}.3"

    def create(self) -> None:
        ip("netns", "add", self.namespace)
        ip("link", "add", self.outside, "type", "veth", "peer", "name", self.inside)
        ip("link", "set", self.inside, "netns", self.namespace)
        ip("addr", "add", f"{self.gateway}/24", "dev", self.outside)
        ip("addr", "add", f"{self.database}/24", "dev", self.outside)
        ip("link", "set", self.outside, "up")
        inside = ("netns", "exec", self.namespace, "ip")
        ip(*inside, "addr", "add", f"{self.address}/24", "dev", self.inside)
        ip(*inside, "link", "set", self.inside, "up")
        ip(*inside, "link", "set", "lo", "up")

    def remove(self) -> None:
        # Deleting the namespace deletes the veth pair with it.
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def network():
    subnet = unused_subnet()
    hosts = [NetworkHost(subnet, n) for n in range(1, HOSTS + 1)]
    try:
        for host in hosts:
            host.create()
        yield hosts
    finally:
        for host in hosts:
            host.remove()


@pytest.fixture(scope="module")
def cluster(network):
    """A PostgreSQL cluster listening on loopback and on this side of each host's link."""
    listen = ",".join(["127.0.0.1", *(host.database for host in network)])
    allow = tuple(f"{host.address}/32" for host in network)
    cluster = PostgresCluster(listen=listen, allow=allow)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


class Deployment:
    """The hosts' gunicorns, nginx in front of them, and the database they share."""

    def __init__(self, gunicorns: list[Gunicorn], nginx: Nginx, backend: Backend):
        self.gunicorns, self.nginx, self.backend = gunicorns, nginx, backend


@pytest.fixture
def deployment(network, cluster, tmp_path):
    """Three hosts started at the same moment on an empty database, and nginx before them."""
    name = cluster.new_database(migrated=False)
    gunicorns = [
        Gunicorn(
            tmp_path,
            workers=2,
            host=host.address,
            namespace=host.namespace,
            env={
                "CUSTOMERS_DATABASE_URL": cluster.url(name, host=host.database),
                "CUSTOMERS_POSTGRES_POOL_TIMEOUT": "1",
            },
        )
        for host in network
    ]
    together = threading.Barrier(HOSTS)

    def start(gunicorn: Gunicorn) -> None:
        together.wait()
        gunicorn.start()

    try:
        with ThreadPoolExecutor(HOSTS) as pool:
            list(pool.map(start, gunicorns))
        nginx = Nginx(tmp_path / "nginx", [f"{g.host}:{g.port}" for g in gunicorns]).start()
        try:
            url = cluster.url(name)
            yield Deployment(gunicorns, nginx, Backend("postgres", {}, url=url))
        finally:
            nginx.stop()
    finally:
        for gunicorn in gunicorns:
            gunicorn.stop()
        cluster.drop_database(name)


def test_three_hosts_started_together_apply_each_migration_step_once(deployment):
    versions = deployment.backend.fetch("SELECT version FROM schema_migrations ORDER BY 1")
    assert versions == [(n,) for n in range(1, len(pg_schema.MIGRATIONS) + 1)]
    for gunicorn in deployment.gunicorns:
        assert "Traceback" not in gunicorn.log()
        assert requests.get(gunicorn.url + "/health", timeout=10).status_code == 200


def test_three_hosts_with_16_clients_each_upserting_one_set_of_ids(deployment):
    ids = [f"shared-{n}" for n in range(40)]
    sent: dict[str, set] = {customer_id: set() for customer_id in ids}
    lock = threading.Lock()

    def client(number: int) -> list[int]:
        host = deployment.gunicorns[number % HOSTS]
        statuses = []
        with requests.Session() as session:
            for attempt in range(20):
                customer_id = random.choice(ids)
                values = (f"client {number} try {attempt}", random.choice(["FR", "US", None]))
                with lock:
                    sent[customer_id].add(values)
                body = {"customer_id": customer_id, "name": values[0], "country": values[1]}
                url = host.url + "/api/v1/customers"
                response = session.post(url, json={"customer": body}, headers=AUTH, timeout=30)
                statuses.append(response.status_code)
        return statuses

    with ThreadPoolExecutor(16 * HOSTS) as pool:
        statuses = [s for run in pool.map(client, range(16 * HOSTS)) for s in run]
    assert statuses == [200] * (16 * HOSTS * 20)
    rows = deployment.backend.fetch("SELECT customer_id, name, country FROM customers")
    touched = {customer_id for customer_id, values in sent.items() if values}
    assert sorted(r[0] for r in rows) == sorted(touched)  # one row per id
    for customer_id, name, country in rows:
        assert (name, country) in sent[customer_id]  # values that one request sent
    for gunicorn in deployment.gunicorns:  # the total is exact, seen from every host
        page = requests.get(gunicorn.url + "/api/v1/customers", headers=AUTH, timeout=10).json()
        assert page["meta"]["total_count"] == len(touched)


def test_one_host_killed_under_load_loses_no_acknowledged_write(deployment):
    killed = deployment.gunicorns[0]
    with WriteLoad(deployment.nginx.url, clients=8) as load:
        time.sleep(1.5)
        os.killpg(killed.proc.pid, signal.SIGKILL)  # the whole host's server, mid-load
        killed.proc.wait(timeout=10)
        before = len(load.statuses)
        time.sleep(2)
    after_kill = load.statuses[before:]
    assert load.acked and after_kill.count(200) > 20, "nginx did not carry on with the others"
    # Only the requests the dead host held when it died can fail, as nginx's 502.
    assert set(load.statuses) <= {200, 502}
    assert load.statuses.count(502) <= load.clients
    assert_all_acknowledged_present(deployment.backend, load.acked)


def test_postgres_restarted_under_load_is_only_503s_and_the_hosts_recover(deployment, cluster):
    with WriteLoad(deployment.nginx.url, clients=8) as load:
        time.sleep(1)
        cluster.stop("fast")
        time.sleep(2)
        cluster.start()
        deadline = time.monotonic() + 30
        for gunicorn in deployment.gunicorns:  # every host serves again, by itself
            while requests.get(gunicorn.url + "/health", timeout=30).status_code != 200:
                assert time.monotonic() < deadline, f"{gunicorn.url} did not recover"
                time.sleep(0.2)
        recovered = len(load.statuses)
        time.sleep(1)
    assert 503 in load.statuses, "the load never met the outage"
    assert set(load.statuses) <= {200, 503}, sorted(set(load.statuses))
    assert load.statuses[recovered:].count(200) > 10
    assert_all_acknowledged_present(deployment.backend, load.acked)
    for gunicorn in deployment.gunicorns:
        assert "Traceback" not in gunicorn.log()


def test_a_host_cut_off_from_the_database_answers_503_and_recovers(deployment, network):
    """A network split drops packets without closing anything: the host must notice (TCP
    keepalives, tcp_user_timeout) and answer 503 well within gunicorn's 30 s worker timeout."""
    host, gunicorn = network[0], deployment.gunicorns[0]
    url = gunicorn.url + "/api/v1/customers"
    body = {"customer": {"customer_id": "split", "name": "N"}}
    assert requests.post(url, json=body, headers=AUTH, timeout=30).status_code == 200
    blackhole = ("netns", "exec", host.namespace, "ip", "route")
    ip(*blackhole, "add", "blackhole", f"{host.database}/32")
    try:
        started = time.monotonic()
        response = requests.post(url, json=body, headers=AUTH, timeout=60)
        waited = time.monotonic() - started
    finally:
        ip(*blackhole, "del", "blackhole", f"{host.database}/32")
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "database_unavailable"
    assert waited < 25, f"the split was noticed only after {waited:.0f} s"
    deadline = time.monotonic() + 30
    while requests.post(url, json=body, headers=AUTH, timeout=60).status_code != 200:
        assert time.monotonic() < deadline, "the host did not recover by itself"
        time.sleep(0.2)


def test_a_consumer_paging_while_three_hosts_write_sees_every_change_once_in_order(deployment):
    """Two writers on each host, a consumer paging the feed through nginx all along."""
    writer_urls = [gunicorn.url for gunicorn in deployment.gunicorns] * 2
    run_writers_and_a_consumer(deployment.nginx.url, writer_urls, count=50)
