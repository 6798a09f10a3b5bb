-- msknode auto-routing rule for Orthanc (Lua OnStoredInstance).
--
-- Forwards every new MR instance to msknode as soon as Orthanc has stored it (the PACS
-- pushes, as in a hospital), EXCEPT the objects msknode created itself, so that results
-- sent back into the study are never routed to msknode again (no loops):
--   * instances whose SOP Instance UID or Series Instance UID starts with msknode's UID root;
--   * instances whose Manufacturer, or a Contributing Equipment item, is "msknode";
--   * instances that msknode's AE title sent to Orthanc.
--
-- Settings: Lua globals set by a script loaded before this one (LuaScripts is an ordered
-- list), else environment variables of the Orthanc process, else the defaults below.
--   MSKNODE_MODALITY   name of msknode in Orthanc's "DicomModalities"   (default "msknode")
--   MSKNODE_UID_ROOT   msknode's UID root (MSKNODE_UID_ROOT of the node)  (default msknode's)
--   MSKNODE_AE_TITLE   msknode's AE title (MSKNODE_AE_TITLE of the node)  (default "MSKNODE")
--   MSKNODE_ROUTE_MODALITIES  comma list of Modality values to forward  (default "MR")
--
-- Orthanc keeps the association that Lua opens for "DicomAssociationCloseDelay" seconds
-- after the last forwarded instance; msknode's completeness timers start when it closes
-- (or at once when a series announces its size), so keep that delay short (1-2 s).

local function setting(name, default)
  local value = rawget(_G, name)
  if value == nil or value == '' then
    value = os.getenv(name)
  end
  if value == nil or value == '' then
    value = default
  end
  return value
end

local MODALITY = setting('MSKNODE_MODALITY', 'msknode')
local UID_ROOT = setting('MSKNODE_UID_ROOT', '1.2.826.0.1.3680043.10.1447.')
local AE_TITLE = setting('MSKNODE_AE_TITLE', 'MSKNODE')
local ROUTE_MODALITIES = {}
for m in string.gmatch(setting('MSKNODE_ROUTE_MODALITIES', 'MR'), '[^,%s]+') do
  ROUTE_MODALITIES[string.upper(m)] = true
end
if string.sub(UID_ROOT, -1) ~= '.' then
  UID_ROOT = UID_ROOT .. '.'
end

local function trim(s)
  if type(s) ~= 'string' then
    return ''
  end
  return (string.gsub(s, '^%s*(.-)%s*$', '%1'))
end

local function startsWith(s, prefix)
  return type(s) == 'string' and string.sub(s, 1, #prefix) == prefix
end

local function isMsknode(name)
  return string.lower(trim(name)) == 'msknode'
end

-- Why an instance is one of msknode's own objects, or nil.
local function ownObject(tags, origin)
  if startsWith(tags['SOPInstanceUID'], UID_ROOT) or startsWith(tags['SeriesInstanceUID'], UID_ROOT) then
    return 'msknode UID root'
  end
  if isMsknode(tags['Manufacturer']) then
    return 'Manufacturer msknode'
  end
  local equipment = tags['ContributingEquipmentSequence']
  if type(equipment) == 'table' then
    for _, item in ipairs(equipment) do
      if type(item) == 'table' and isMsknode(item['Manufacturer']) then
        return 'Contributing Equipment msknode'
      end
    end
  end
  if origin ~= nil and trim(origin['RemoteAet']) == AE_TITLE then
    return 'sent by ' .. AE_TITLE
  end
  return nil
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin ~= nil and origin['RequestOrigin'] == 'Lua' then
    return  -- stored by a Lua script, not by a modality
  end
  if not ROUTE_MODALITIES[string.upper(trim(tags['Modality']))] then
    return
  end
  if ownObject(tags, origin) ~= nil then
    return
  end
  SendToModality(instanceId, MODALITY)
end

print('msknode auto-routing: ' .. table.concat((function()
  local list = {}
  for m, _ in pairs(ROUTE_MODALITIES) do
    table.insert(list, m)
  end
  return list
end)(), ',') .. ' instances -> modality "' .. MODALITY .. '", except UID root ' .. UID_ROOT
  .. ', Manufacturer msknode and AE ' .. AE_TITLE)
