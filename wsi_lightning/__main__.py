from wsi_lightning.cli import main

raise SystemExit(main())
