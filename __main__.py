"""``python -m customers_service ...``: flask's command line on the standalone service, from any
folder. (``flask --app wsgi`` names the app's module after the folder it runs in, and this
repository's folder is a package: from a checkout in ``customers-service/`` or ``tmp.x1y2/``
that name cannot be imported.)"""

from flask.cli import FlaskGroup

from customers_service.app import create_app

cli = FlaskGroup(create_app=lambda: create_app(), help="The customers service's commands.")

if __name__ == "__main__":
    cli.main(prog_name="python -m customers_service")
