"""The example app's hello handler as gunicorn's tornado worker wants it.

gunicorn's ``-k tornado`` worker (gunicorn/workers/gtornado.py) serves a
``tornado.web.Application`` *instance* as is; anything else, including a
function returning an Application, is wrapped as a WSGI callable.  So this
module exposes the instance: ``gunicorn -k tornado -w 4 bench.gunicorn_hello:app``
from the project directory.
"""

from app import make_app

app = make_app()
