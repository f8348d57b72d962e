import threading

from pagedkv.locked import LockedBlockManager


def test_threads_share_a_locked_manager():
    mgr = LockedBlockManager(num_pages=400, page_size=4, enable_prefix_caching=True)
    errors = []

    def worker(base):
        try:
            for i in range(200):
                seq = base + i
                with mgr.lock:  # check-then-act under one lock
                    if mgr.can_allocate(6):
                        mgr.allocate(seq, 6)
                    else:
                        continue
                mgr.append_batch([seq], 3)
                mgr.fork(seq, seq + 10_000)
                mgr.append(seq + 10_000, 2)
                mgr.free(seq)
                mgr.free(seq + 10_000)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    mgr.check_invariants()
    mgr.end_step()  # the last copies ran
    assert mgr.num_free_pages == 400 and mgr.num_sequences == 0
    assert "Locked" in repr(mgr) and 5 not in mgr
