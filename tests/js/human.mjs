// The human of the client-trust tests: matrix-js-sdk 43 with its Rust crypto, the
// crypto of Element Web, logged in to the test Synapse. Driven by
// tests/helpers/js_human.py: one JSON command per line on stdin, one JSON answer per
// line on stdout ({id, ok, result} or {id, ok: false, error}); the SDK's logs go to
// stderr.

// Node 20 lacks Promise.withResolvers, which the SDK uses: define it before the import.
if (typeof Promise.withResolvers !== "function") {
    Promise.withResolvers = function withResolvers() {
        let resolve, reject;
        const promise = new Promise((ok, fail) => {
            resolve = ok;
            reject = fail;
        });
        return { promise, resolve, reject };
    };
}

const sdk = await import("matrix-js-sdk");
const cryptoApi = await import("matrix-js-sdk/lib/crypto-api/index.js");
const { logger } = await import("matrix-js-sdk/lib/logger.js");
const readline = await import("node:readline");

// Only warnings and errors, on stderr (stdout is the answers' channel).
logger.setLevel(process.env.JS_HUMAN_LOG || "warn");
for (const method of ["trace", "debug", "info", "log", "warn", "error"]) {
    console[method] = (...args) => process.stderr.write(args.map(String).join(" ") + "\n");
}

const SHIELD_COLOURS = ["NONE", "GREY", "RED"];

let client = null;
/** Every timeline event seen, by event id: what the tests ask about. */
const seen = new Map();

function remember(event) {
    const room = event.getRoomId();
    if (!room || event.getType() === "m.room.member") return;
    seen.set(event.getId(), event);
}

async function describe(event) {
    const content = event.getContent();
    const found = {
        event_id: event.getId(),
        room_id: event.getRoomId(),
        sender: event.getSender(),
        type: event.getType(),
        encrypted: event.isEncrypted(),
        body: typeof content.body === "string" ? content.body : null,
        decryption_failure: event.isDecryptionFailure() ? String(event.decryptionFailureReason) : null,
        shield: null,
    };
    if (event.isEncrypted() && !event.isDecryptionFailure() && !event.isBeingDecrypted()) {
        const info = await client.getCrypto().getEncryptionInfoForEvent(event);
        if (info) {
            found.shield = {
                colour: SHIELD_COLOURS[info.shieldColour] ?? String(info.shieldColour),
                reason: info.shieldReason === null ? null : cryptoApi.EventShieldReason[info.shieldReason],
            };
        }
    }
    return found;
}

const commands = {
    async login({ base_url, user, password, strict }) {
        const bare = sdk.createClient({ baseUrl: base_url });
        const login = await bare.loginRequest({
            type: "m.login.password",
            identifier: { type: "m.id.user", user },
            password,
            initial_device_display_name: "js-sdk human",
        });
        client = sdk.createClient({
            baseUrl: base_url,
            userId: login.user_id,
            accessToken: login.access_token,
            deviceId: login.device_id,
        });
        await client.initRustCrypto({ useIndexedDB: false });
        const mode = strict
            ? new cryptoApi.OnlySignedDevicesIsolationMode()
            : new cryptoApi.AllDevicesIsolationMode(false);
        client.getCrypto().setDeviceIsolationMode(mode);
        // Like an Element user: a cross-signing identity signing this device (strict
        // mode refuses to send without one).
        await client.getCrypto().bootstrapCrossSigning({
            authUploadDeviceSigningKeys: async (makeRequest) => {
                await makeRequest({
                    type: "m.login.password",
                    identifier: { type: "m.id.user", user },
                    password,
                });
            },
        });
        client.on(sdk.RoomEvent.Timeline, (event) => remember(event));
        client.on(sdk.MatrixEventEvent.Decrypted, (event) => remember(event));
        const ready = new Promise((resolve) => {
            client.on(sdk.ClientEvent.Sync, (state) => {
                if (state === "PREPARED" || state === "SYNCING") resolve();
            });
        });
        await client.startClient({ initialSyncLimit: 20 });
        await ready;
        return { user_id: login.user_id, device_id: login.device_id };
    },

    async create_room({ invite }) {
        const reply = await client.createRoom({
            invite,
            initial_state: [
                {
                    type: "m.room.encryption",
                    state_key: "",
                    content: { algorithm: "m.megolm.v1.aes-sha2" },
                },
            ],
        });
        return { room_id: reply.room_id };
    },

    async joined({ room_id }) {
        const room = client.getRoom(room_id);
        return { users: room ? room.getJoinedMembers().map((m) => m.userId) : [] };
    },

    async send({ room_id, body }) {
        const reply = await client.sendTextMessage(room_id, body);
        return { event_id: reply.event_id };
    },

    async events({ room_id }) {
        const found = [];
        for (const event of seen.values()) {
            if (event.getRoomId() === room_id) found.push(await describe(event));
        }
        return { events: found };
    },

    async stop() {
        client?.stopClient();
        setTimeout(() => process.exit(0), 50);
        return {};
    },
};

const lines = readline.createInterface({ input: process.stdin });
lines.on("line", async (line) => {
    let request;
    try {
        request = JSON.parse(line);
    } catch (error) {
        return;
    }
    let answer;
    try {
        const command = commands[request.cmd];
        if (!command) throw new Error(`unknown command ${request.cmd}`);
        answer = { id: request.id, ok: true, result: await command(request.args || {}) };
    } catch (error) {
        answer = { id: request.id, ok: false, error: String(error?.stack || error) };
    }
    process.stdout.write(JSON.stringify(answer) + "\n");
});
lines.on("close", () => process.exit(0));
