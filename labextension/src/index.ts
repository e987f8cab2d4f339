import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  ICommandPalette,
  Notification,
  ToolbarButton
} from '@jupyterlab/apputils';
import { DocumentRegistry } from '@jupyterlab/docregistry';
import {
  INotebookModel,
  INotebookTracker,
  NotebookPanel
} from '@jupyterlab/notebook';
import { checkIcon } from '@jupyterlab/ui-components';
import { DisposableDelegate, IDisposable } from '@lumino/disposable';

import { Federation, IVerifyResult } from './federation';
// The side panel is created in activate(), so it is needed at once.
// eslint-disable-next-line jupyter/prefer-lazy-imports
import { copyJoinLine, FederationPanel } from './panel';

namespace CommandIDs {
  export const verifyData = 'fedmagic:verify-data';
  export const showPanel = 'fedmagic:show-panel';
  export const stopTasks = 'fedmagic:stop-tasks';
  export const copyJoinLine = 'fedmagic:copy-join-line';
}

const CATEGORY = 'Federated Learning';

/** What the commands take: no arguments. */
const NO_ARGS = { args: { type: 'object', properties: {} } };

/** The Federation of each open notebook, ended when the notebook closes. */
class Federations {
  of(panel: NotebookPanel): Federation {
    let federation = this._byPanel.get(panel);
    if (federation === undefined) {
      federation = new Federation(panel.sessionContext);
      this._byPanel.set(panel, federation);
      panel.disposed.connect(() => {
        federation!.dispose();
        this._byPanel.delete(panel);
      });
    }
    return federation;
  }

  private _byPanel = new Map<NotebookPanel, Federation>();
}

/**
 * A Verify data button in the toolbar of participant notebooks: those whose
 * kernel has joined a task, or that carry fedmagic metadata.
 */
class VerifyDataButton implements DocumentRegistry.IWidgetExtension<
  NotebookPanel,
  INotebookModel
> {
  constructor(
    federations: Federations,
    verify: (panel: NotebookPanel) => Promise<void>
  ) {
    this._federations = federations;
    this._verify = verify;
  }

  createNew(panel: NotebookPanel): IDisposable {
    const button = new ToolbarButton({
      className: 'fedmagic-verify-button',
      icon: checkIcon,
      label: 'Verify data',
      tooltip: "Run this task's DatasetVerify on this machine's data",
      onClick: () => void this._verify(panel)
    });
    const federation = this._federations.of(panel);
    const update = () => {
      const marked = panel.model?.getMetadata('fedmagic') !== undefined;
      button.setHidden(!marked && federation.joins.length === 0);
    };
    update();
    federation.changed.connect(update);
    panel.model?.metadataChanged.connect(update);
    panel.toolbar.insertAfter('cellType', 'fedmagicVerifyData', button);
    return new DisposableDelegate(() => {
      federation.changed.disconnect(update);
      button.dispose();
    });
  }

  private _federations: Federations;
  private _verify: (panel: NotebookPanel) => Promise<void>;
}

function notify(results: IVerifyResult[]): void {
  for (const result of results) {
    const where = result.task_id
      ? `${result.node} in task ${result.task_id}: `
      : '';
    if (result.passed) {
      Notification.success(`${where}data verified (${result.detail})`, {
        autoClose: 6000
      });
    } else {
      Notification.error(`${where}data verification failed: ${result.detail}`, {
        autoClose: false
      });
    }
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'fedmagic:plugin',
  description:
    'Federated tasks in JupyterLab: the Federation panel and Verify data.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null
  ) => {
    const federations = new Federations();
    const current = (): NotebookPanel | null => tracker.currentWidget;

    const verify = async (panel: NotebookPanel): Promise<void> => {
      const results = await federations.of(panel).verifyData();
      notify(results);
    };

    const sidePanel = new FederationPanel(async () => {
      const panel = current();
      if (panel) {
        await verify(panel);
      }
    });
    app.shell.add(sidePanel, 'right', { rank: 900 });
    const follow = (): void => {
      const panel = current();
      sidePanel.follow(panel, panel ? federations.of(panel) : null);
    };
    tracker.currentChanged.connect(follow);
    follow();

    app.docRegistry.addWidgetExtension(
      'Notebook',
      new VerifyDataButton(federations, verify)
    );

    const hasNotebook = () => current() !== null;
    app.commands.addCommand(CommandIDs.verifyData, {
      describedBy: NO_ARGS,
      label: 'Verify Data of the Joined Tasks',
      caption: "Run each joined task's DatasetVerify on this machine's data",
      icon: checkIcon,
      isEnabled: hasNotebook,
      execute: () => {
        const panel = current();
        return panel ? verify(panel) : undefined;
      }
    });
    app.commands.addCommand(CommandIDs.showPanel, {
      describedBy: NO_ARGS,
      label: 'Show the Federation Panel',
      execute: () => app.shell.activateById(sidePanel.id)
    });
    app.commands.addCommand(CommandIDs.stopTasks, {
      describedBy: NO_ARGS,
      label: "Stop This Notebook's Federated Tasks After Their Round",
      isEnabled: () => {
        const panel = current();
        return (
          !!panel &&
          federations.of(panel).tasks.some(t => t.status === 'running')
        );
      },
      execute: () => {
        const panel = current();
        if (panel) {
          const federation = federations.of(panel);
          federation.tasks
            .filter(t => t.status === 'running')
            .forEach(t => federation.stop(t.task_id));
        }
      }
    });
    app.commands.addCommand(CommandIDs.copyJoinLine, {
      describedBy: NO_ARGS,
      label: "Copy the Join Line of This Notebook's Task",
      isEnabled: () => {
        const panel = current();
        return !!panel && federations.of(panel).tasks.length > 0;
      },
      execute: () => {
        const panel = current();
        const task = panel ? federations.of(panel).tasks[0] : undefined;
        if (task) {
          copyJoinLine(task);
        }
      }
    });
    if (palette) {
      for (const command of Object.values(CommandIDs)) {
        palette.addItem({ command, category: CATEGORY });
      }
    }
  }
};

export default plugin;
