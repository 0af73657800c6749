"""A client method that runs only inside the test's externally started Ray cluster."""

import os

from clients.sgd import SGDClient

CLUSTER_MARK = "FEDSTREAM_TEST_CLUSTER"


class OnlyInTheTestCluster(SGDClient):
    """Plain SGD, in a worker process of the cluster whose raylet carries CLUSTER_MARK."""

    def begin(self, model, context):
        if os.environ.get(CLUSTER_MARK) != "1":
            raise RuntimeError(f"client ran outside the test cluster ({CLUSTER_MARK} unset)")
