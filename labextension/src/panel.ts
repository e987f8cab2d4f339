import { Clipboard, Notification } from '@jupyterlab/apputils';
import { NotebookPanel } from '@jupyterlab/notebook';
import {
  caretDownIcon,
  caretRightIcon,
  LabIcon
} from '@jupyterlab/ui-components';
import type { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import {
  budgetText,
  secureText,
  codeText,
  collapsedByDefault,
  consentState,
  consentText,
  guaranteesText,
  headline,
  joinRoundText,
  maskToken,
  taskStatusLine,
  taskSummary,
  verificationText,
  verifyTooltip,
  whyVerifyIsDisabled
} from './describe';
import { Federation, IJoinState, ITaskState } from './federation';

const FEDERATION_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
  '<g class="jp-icon3" fill="#616161"><circle cx="12" cy="4" r="3"/><circle cx="4" cy="19" r="3"/>' +
  '<circle cx="20" cy="19" r="3"/><path d="M11 7h2v5.4l5.2 4.2-1.3 1.5L12 14.2l-4.9 3.9-1.3-1.5 ' +
  '5.2-4.2z"/></g></svg>';

export const federationIcon = new LabIcon({
  name: 'fedmagic:federation',
  svgstr: FEDERATION_SVG
});

/** How often a running task's clocks move on between the kernel's updates. */
const TICK_MS = 1000;

/**
 * The Federation side panel: the tasks the current notebook's kernel runs
 * (newest first) or has joined. A task card shows its status and clocks,
 * participants, last metrics, for a private task the budget spent and its
 * guarantees, the join line (token masked) to copy, and Stop while it runs or
 * its checkpoint once it ended; ended cards start collapsed. A join card shows
 * the code offered and what it promises about privacy, its owner's decision,
 * Verify data and the rounds.
 */
export class FederationPanel extends Widget {
  constructor(verify: () => Promise<void>) {
    super();
    this._verify = verify;
    this.id = 'fedmagic-federation';
    this.addClass('fedmagic-FederationPanel');
    this.title.icon = federationIcon;
    this.title.caption = 'Federation: the tasks of this notebook';
    this.render();
  }

  /** Follow another notebook (or none). */
  follow(notebook: NotebookPanel | null, federation: Federation | null): void {
    this._federation?.changed.disconnect(this.render, this);
    this._notebook = notebook;
    this._federation = federation;
    federation?.changed.connect(this.render, this);
    this.render();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._federation?.changed.disconnect(this.render, this);
    this._stopTicking();
    super.dispose();
  }

  render(): void {
    const node = this.node;
    this._clocks = [];
    node.replaceChildren(element('h2', 'Federation'));
    const federation = this._federation;
    if (this._notebook === null || federation === null) {
      node.append(
        element(
          'p',
          'Open a notebook to see its federated tasks.',
          'fedmagic-hint'
        )
      );
      return;
    }
    node.append(
      element('div', this._notebook.title.label, 'fedmagic-notebook')
    );
    if (!federation.connected) {
      node.append(
        element(
          'p',
          "This notebook's kernel has not loaded fedmagic: run " +
            '%load_ext fedmagic to author or join a task.',
          'fedmagic-hint'
        )
      );
      return;
    }
    if (federation.tasks.length === 0 && federation.joins.length === 0) {
      node.append(
        element(
          'p',
          'No task yet: run a %%fedavg_task cell to start one, or ' +
            '%fedavg_join to join one.',
          'fedmagic-hint'
        )
      );
    }
    federation.tasks.forEach(task =>
      node.append(this._taskCard(federation, task))
    );
    federation.joins.forEach(join =>
      node.append(this._joinCard(federation, join))
    );
  }

  protected onBeforeShow(): void {
    this.render();
  }

  protected onAfterAttach(msg: Message): void {
    super.onAfterAttach(msg);
    this._ticker = window.setInterval(this._tick, TICK_MS);
  }

  protected onBeforeDetach(msg: Message): void {
    this._stopTicking();
    super.onBeforeDetach(msg);
  }

  private _taskCard(federation: Federation, task: ITaskState): HTMLElement {
    const key = `task:${task.task_id}`;
    const collapsed = this._collapsed.get(key) ?? collapsedByDefault(task);
    const card = element(
      'section',
      '',
      `fedmagic-TaskCard fedmagic-status-${task.status}` +
        (collapsed ? ' fedmagic-mod-collapsed' : '')
    );
    card.dataset.taskId = task.task_id;
    card.dataset.status = task.status;
    card.dataset.collapsed = String(collapsed);

    const toggle = element('button', '', 'fedmagic-card-toggle');
    toggle.dataset.key = key;
    toggle.setAttribute('aria-expanded', String(!collapsed));
    toggle.append(
      (collapsed ? caretRightIcon : caretDownIcon).element({
        className: 'fedmagic-chevron',
        tag: 'span'
      }),
      element('span', task.task_id, 'fedmagic-card-title')
    );
    const title = element('h3', '');
    title.append(toggle);
    const header = element('header', '', 'fedmagic-card-header');
    header.append(
      title,
      element('span', taskSummary(task), 'fedmagic-card-summary')
    );
    header.addEventListener('click', () => {
      this._collapsed.set(key, !collapsed);
      this.render();
      this.node
        .querySelector<HTMLElement>(
          `.fedmagic-card-toggle[data-key="${CSS.escape(key)}"]`
        )
        ?.focus();
    });
    card.append(header);

    const body = element('div', '', 'fedmagic-card-body');
    body.hidden = collapsed;
    let status: HTMLElement;
    if (task.status === 'running') {
      status = element(
        'span',
        this._statusLine(task),
        'fedmagic-value fedmagic-status-line'
      );
      this._clocks.push({ node: status, task });
    } else {
      status = this._folded(`${key}:status`, taskStatusLine(task));
    }
    body.append(
      row('status', status),
      row('participants', participantsText(task)),
      row('last metrics', metricsText(task.metrics) || 'none yet')
    );
    const budget = budgetText(task);
    if (budget) {
      body.append(row('budget', budget));
    }
    const seen = secureText(task);
    if (seen) {
      body.append(row('secure', seen));
    }
    body.append(...this._privacy(key, guaranteesText(task)));
    if (task.status !== 'running') {
      const path = element(
        'code',
        task.checkpoint ?? 'none saved',
        'fedmagic-value fedmagic-checkpoint'
      );
      body.append(row('checkpoint', path));
    }
    const actions = element('div', '', 'fedmagic-actions');
    if (task.join_command) {
      // a simulation has no data owners to join it
      const joinLine = element(
        'code',
        maskToken(task.join_command),
        'fedmagic-join-line'
      );
      joinLine.dataset.masked = String(
        joinLine.textContent !== task.join_command
      );
      body.append(joinLine);
      actions.append(
        button('Copy join line', 'fedmagic-copy-join-line', () =>
          copyJoinLine(task)
        )
      );
    }
    if (task.status === 'running') {
      const stop = button('Stop after this round', 'fedmagic-stop-task', () =>
        federation.stop(task.task_id)
      );
      stop.disabled = task.stopping;
      actions.append(stop);
    }
    body.append(actions);
    card.append(body);
    return card;
  }

  private _joinCard(federation: Federation, join: IJoinState): HTMLElement {
    const key = `join:${join.task_id}`;
    const card = element(
      'section',
      '',
      `fedmagic-JoinCard fedmagic-status-${join.status}`
    );
    card.dataset.taskId = join.task_id;
    card.dataset.node = join.node;
    card.dataset.consent = consentState(join);
    card.dataset.verified =
      join.verified === null ? 'none' : join.verified ? 'passed' : 'failed';
    const data = row(
      'data',
      this._folded(`${key}:data`, verificationText(join)),
      join.verified === false ? 'fedmagic-failed' : ''
    );
    const consent = row(
      'consent',
      consentText(join),
      join.declined ? 'fedmagic-declined' : ''
    );
    card.append(
      element('h3', `${join.task_id} (as ${join.node})`),
      row('status', this._folded(`${key}:status`, join.detail || join.status)),
      row('code', codeText(join)),
      ...this._privacy(key, guaranteesText(join)),
      consent,
      data,
      row('round', joinRoundText(join))
    );
    const verify = button('Verify data', 'fedmagic-verify-data', () => {
      void this._verify();
    });
    verify.disabled =
      whyVerifyIsDisabled(federation.connected, [join]) !== null;
    verify.title = verifyTooltip(federation.connected, [join]);
    const actions = element('div', '', 'fedmagic-actions');
    actions.append(verify);
    card.append(actions);
    return card;
  }

  /** The privacy row, folded to its first line, where there is a guarantee to show. */
  private _privacy(key: string, guarantees: string): HTMLElement[] {
    if (!guarantees) {
      return [];
    }
    return [
      row(
        'privacy',
        this._folded(`${key}:privacy`, guarantees),
        'fedmagic-privacy'
      )
    ];
  }

  /** `text` as one line; the rest behind a disclosure that stays open across updates. */
  private _folded(key: string, text: string): HTMLElement {
    const { line, more } = headline(text);
    if (!more) {
      return element('span', text, 'fedmagic-value');
    }
    const details = element('details', '', 'fedmagic-value fedmagic-more');
    (details as HTMLDetailsElement).open = this._open.has(key);
    details.append(element('summary', line), element('pre', text));
    details.addEventListener('toggle', () => {
      if ((details as HTMLDetailsElement).open) {
        this._open.add(key);
      } else {
        this._open.delete(key);
      }
    });
    return details;
  }

  private _statusLine(task: ITaskState): string {
    const since = this._federation
      ? (Date.now() - this._federation.receivedAt) / 1000
      : 0;
    return taskStatusLine(task, since);
  }

  private _tick = (): void => {
    if (this.isVisible) {
      this._clocks.forEach(({ node, task }) => {
        node.textContent = this._statusLine(task);
      });
    }
  };

  private _stopTicking(): void {
    if (this._ticker !== null) {
      window.clearInterval(this._ticker);
      this._ticker = null;
    }
  }

  private _verify: () => Promise<void>;
  private _notebook: NotebookPanel | null = null;
  private _federation: Federation | null = null;
  /** Cards whose owner folded or unfolded them, by key; the rest follow their default. */
  private _collapsed = new Map<string, boolean>();
  /** The disclosures their reader opened, by key. */
  private _open = new Set<string>();
  /** The status lines of running tasks, whose clocks tick. */
  private _clocks: Array<{ node: HTMLElement; task: ITaskState }> = [];
  private _ticker: number | null = null;
}

/** Put a task's join line on the clipboard, for its author to send to data owners. */
export function copyJoinLine(task: ITaskState): void {
  Clipboard.copyToSystem(task.join_command);
  Notification.info(
    `Join line of task ${task.task_id} copied (it holds the task's token: ` +
      'send it to data owners only)',
    { autoClose: 4000 }
  );
}

function participantsText(task: ITaskState): string {
  if (task.simulated) {
    return task.simulated;
  }
  if (task.participants.length === 0) {
    return 'none yet';
  }
  const counts = new Map<string, number>();
  task.participants.forEach(p =>
    counts.set(p.status, (counts.get(p.status) ?? 0) + 1)
  );
  return (
    `${task.participants.length} (` +
    [...counts].map(([status, count]) => `${count} ${status}`).join(', ') +
    ')'
  );
}

function metricsText(metrics: Record<string, number | string>): string {
  return Object.entries(metrics)
    .map(
      ([name, value]) =>
        `${name} ${typeof value === 'number' ? Number(value.toPrecision(4)) : value}`
    )
    .join(', ');
}

function element(tag: string, text: string, className = ''): HTMLElement {
  const node = document.createElement(tag);
  node.textContent = text;
  if (className) {
    node.className = className;
  }
  return node;
}

/** A labelled row; its `data-row` names it for tests and styles. */
function row(
  label: string,
  value: string | HTMLElement,
  className = ''
): HTMLElement {
  const line = element('div', '', `fedmagic-row ${className}`.trim());
  line.dataset.row = label.replace(/ /g, '-');
  line.append(
    element('span', label, 'fedmagic-label'),
    typeof value === 'string' ? element('span', value, 'fedmagic-value') : value
  );
  return line;
}

function button(
  label: string,
  className: string,
  onClick: () => void
): HTMLButtonElement {
  const node = element(
    'button',
    label,
    `jp-Button jp-mod-styled jp-mod-reject ${className}`
  ) as HTMLButtonElement;
  node.addEventListener('click', onClick);
  return node;
}
