"""The process's transfer threads: a live change's transfers never queue behind bulk work."""
import threading

from resto_celery import replication


def test_live_transfers_run_while_bulk_transfers_hold_every_bulk_thread():
    release = threading.Event()
    # More than all the transfer threads of the process could take.
    bulk_items = range(replication.TRANSFER_THREADS + replication.BULK_TRANSFER_THREADS + 1)
    bulk = threading.Thread(target=replication.in_parallel, args=(lambda _: release.wait(30), bulk_items, "bulk"))
    bulk.start()
    try:
        done = []
        live = threading.Thread(target=lambda: done.extend(replication.in_parallel(lambda item: item, "abc")))
        live.start()
        live.join(10)
        assert done == [("a", None), ("b", None), ("c", None)], "the live transfers waited for the bulk ones"
    finally:
        release.set()
        bulk.join(30)


def test_bulk_work_runs_on_at_most_its_own_threads_beside_the_calling_one():
    running, peak, lock, release = [0], [0], threading.Lock(), threading.Event()

    def transfer(_):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(0.2)
        with lock:
            running[0] -= 1

    results = replication.in_parallel(transfer, range(replication.BULK_TRANSFER_THREADS * 4), "bulk")

    assert all(error is None for _, error in results)
    assert peak[0] <= replication.BULK_TRANSFER_THREADS + 1
