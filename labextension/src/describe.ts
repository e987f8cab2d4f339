/**
 * What the Federation panel and the commands say about tasks and joins, and
 * which task they mean: pure functions of the kernel's state, with no DOM and
 * no JupyterLab, so the tests run them in Node.
 */
import type { IJoinState, ITaskState } from './federation';

/** Shown instead of the token of a join line on screen; copying takes the real line. */
export const TOKEN_MASK = '••••••••';

/** Longer first lines are cut; the whole text is behind a disclosure. */
export const HEADLINE_CHARS = 80;

/** Seconds as `m:ss` or `h:mm:ss`, as the kernel's summaries write them. */
export function clock(seconds: number): string {
  const whole = Math.max(Math.round(seconds), 0);
  const hours = Math.floor(whole / 3600);
  const minutes = Math.floor((whole % 3600) / 60);
  const secs = String(whole % 60).padStart(2, '0');
  return hours
    ? `${hours}:${String(minutes).padStart(2, '0')}:${secs}`
    : `${minutes}:${secs}`;
}

/**
 * A number as Python's `format(value, 'g')` writes it (`3`, `1.23`, `1e-05`),
 * so the panel says what the kernel's own texts say.
 */
export function formatG(value: number, precision = 6): string {
  if (!Number.isFinite(value)) {
    return Number.isNaN(value) ? 'nan' : value > 0 ? 'inf' : '-inf';
  }
  const [digits, power] = value.toExponential(precision - 1).split('e');
  const exponent = Number(power);
  const trim = (text: string) =>
    text.includes('.') ? text.replace(/\.?0+$/, '') : text;
  if (exponent < -4 || exponent >= precision) {
    const sign = exponent < 0 ? '-' : '+';
    return `${trim(digits)}e${sign}${String(Math.abs(exponent)).padStart(2, '0')}`;
  }
  return trim(value.toFixed(Math.max(precision - 1 - exponent, 0)));
}

/**
 * The privacy budget a task spent, of its target: `ε 1.23 of 3 spent at δ 1e-05`
 * (the kernel's `budget_text`); '' where it counts none.
 */
export function budgetText(task: ITaskState): string {
  if (task.epsilon === null || task.delta === null) {
    return '';
  }
  const of =
    task.target_epsilon === null ? '' : ` of ${formatG(task.target_epsilon)}`;
  return `ε ${formatG(task.epsilon, 3)}${of} spent at δ ${formatG(task.delta)}`;
}

/**
 * What the initiator saw of a secure task's last round: `seen: only the sum of 4 masked
 * updates (t=3)` (the kernel's `secure_text`); '' for a task that does not aggregate securely.
 */
export function secureText(task: ITaskState): string {
  if (task.secure_sum === null || task.secure_sum === undefined) {
    return '';
  }
  const [updates, threshold] = task.secure_sum;
  return `seen: only the sum of ${updates} masked updates (t=${threshold})`;
}

/** What a task or the code offered promises about privacy, a line each; '' for nothing. */
export function guaranteesText(state: {
  readonly guarantees: readonly string[];
}): string {
  return state.guarantees.join('\n');
}

/** A join line with its token masked, for showing (the token lets anyone join). */
export function maskToken(line: string): string {
  return line.replace(/(--token[ =])\S+/g, `$1${TOKEN_MASK}`);
}

/**
 * The task "Copy the join line" means: the newest running one, else the newest
 * (the kernel sends its tasks newest first).
 */
export function taskToCopy(
  tasks: readonly ITaskState[]
): ITaskState | undefined {
  return tasks.find(task => task.status === 'running') ?? tasks[0];
}

/** Whether a task's card starts collapsed: once the task ended. */
export function collapsedByDefault(task: ITaskState): boolean {
  return task.status !== 'running';
}

/** A task's rounds as `round 3/5`. */
export function roundText(task: ITaskState): string {
  return `round ${task.round}/${task.max_rounds || '?'}`;
}

/** What a task card's header says, seen even when it is collapsed. */
export function taskSummary(task: ITaskState): string {
  if (task.status === 'running') {
    return task.stopping ? 'stopping' : roundText(task);
  }
  return `${task.status} · ${roundText(task)}`;
}

/**
 * How a task stands, as the first line of its card's status:
 * `round 3/5 · 0:41 elapsed · ~0:27 left` while it runs.
 *
 * @param since - seconds since its state arrived, which its clocks move on by.
 */
export function taskStatusLine(task: ITaskState, since = 0): string {
  if (task.status === 'failed') {
    return failureText(task);
  }
  if (task.status === 'finished') {
    return `finished · ${roundText(task)} · took ${clock(task.elapsed)}`;
  }
  const parts = [roundText(task), `${clock(task.elapsed + since)} elapsed`];
  if (task.remaining !== null) {
    parts.push(`~${clock(task.remaining - since)} left`);
  }
  if (task.stopping) {
    parts.unshift('stopping after this round');
  }
  return parts.join(' · ');
}

/**
 * What ended a failed task, without the "task 'x'" its card's title already
 * names: `failed in round 2: only 1 of the 2 participants...`.
 */
export function failureText(task: ITaskState): string {
  const error = task.error ?? 'no reason given';
  for (const quote of ["'", '"']) {
    const named = `task ${quote}${task.task_id}${quote} `;
    if (error.startsWith(named)) {
      return error.slice(named.length);
    }
  }
  return error.startsWith('failed') ? error : `failed: ${error}`;
}

/** A text as one line (its first, cut at `width`), and whether there is more to it. */
export function headline(
  text: string,
  width = HEADLINE_CHARS
): { line: string; more: boolean } {
  const first = text.split('\n', 1)[0];
  if (first.length > width) {
    return { line: `${first.slice(0, width - 1).trimEnd()}…`, more: true };
  }
  return { line: first, more: first !== text };
}

/** Where a data owner stands on the code offered in its current join. */
export function consentState(
  join: IJoinState
): 'accepted' | 'declined' | 'pending' | 'none' {
  if (join.code_hash === null) {
    return 'none';
  }
  return join.accepted ? 'accepted' : join.declined ? 'declined' : 'pending';
}

/** The consent row of a join card. */
export function consentText(join: IJoinState): string {
  switch (consentState(join)) {
    case 'accepted':
      return 'accepted';
    case 'declined':
      return 'declined';
    case 'pending':
      return 'waiting for your decision';
    default:
      return 'no code to decide on yet';
  }
}

/** The code row of a join card. */
export function codeText(join: IJoinState): string {
  return join.code_hash === null
    ? 'not received yet'
    : `hash ${join.code_hash.slice(0, 16)}`;
}

/** The data row of a join card: Verify data for the code offered now. */
export function verificationText(join: IJoinState): string {
  if (join.verified === null) {
    return join.code_hash === null
      ? 'no code to verify yet'
      : 'not verified yet';
  }
  return `${join.verified ? 'passed' : 'failed'}: ${join.verification}`;
}

/** The round row of a join card; `not started` while the code's rounds are unknown. */
export function joinRoundText(join: IJoinState): string {
  if (join.declined) {
    return 'none: declined';
  }
  return join.max_rounds === null
    ? 'not started'
    : `${join.round}/${join.max_rounds}`;
}

/**
 * Why Verify data cannot run for a notebook now, or null when it can: it
 * checks a data owner's data for a task the notebook's kernel joined.
 */
export function whyVerifyIsDisabled(
  connected: boolean,
  joins: readonly IJoinState[]
): string | null {
  if (!connected) {
    return "fedmagic is not loaded in this notebook's kernel: run %load_ext fedmagic first";
  }
  if (joins.length === 0) {
    return (
      "This notebook's kernel has joined no task: Verify data checks your " +
      'data for a task you joined with %fedavg_join'
    );
  }
  if (joins.every(join => join.code_hash === null)) {
    return "The task's code has not arrived yet: Verify data runs its DatasetVerify once it is here";
  }
  return null;
}

/** The Verify data button's tooltip: why it is disabled, else what it does. */
export function verifyTooltip(
  connected: boolean,
  joins: readonly IJoinState[]
): string {
  return (
    whyVerifyIsDisabled(connected, joins) ??
    "Run each joined task's DatasetVerify on this machine's data"
  );
}
