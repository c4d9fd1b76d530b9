"""One harness for the tests, the demo, the bench and the chaos run: databases, RabbitMQ
vhosts, subprocesses and free ports."""
