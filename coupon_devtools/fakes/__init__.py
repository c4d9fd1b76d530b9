"""In-memory fakes of the runtime's seams for tests, the demo and the bench: the ledger and its
unit of work (``ledger``, one part per consumer as the real one: ``ledger_issuing``,
``ledger_sweeping``, ``ledger_support``, over ``ledger_state``), the Capillary API
(``capillary``) and the publisher (``broker``). They implement the runtime's protocols and may
import ``worker``; the runtime never imports them (an import-linter contract says so), and its
package ``worker`` holds none.
"""
