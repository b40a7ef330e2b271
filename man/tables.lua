-- For kvmnetd.toml(5): each table of docs/config.md becomes a list of tagged paragraphs.
-- man wraps those to any terminal; five tbl columns do not fit in 80 and make groff warn.
-- A row "key | type | default | example | meaning" becomes the key, then
-- "type: ...; default: ...; example: ..." and the meaning; a two-column row is a term
-- and its text.
local utils = pandoc.utils

local function inlines(cell)
  return utils.blocks_to_inlines(cell.contents)
end

function Table(tbl)
  local header = {}
  for i, cell in ipairs(tbl.head.rows[1].cells) do
    header[i] = utils.stringify(cell.contents)
  end
  local n = #header
  local items = {}
  for _, body in ipairs(tbl.bodies) do
    for _, row in ipairs(body.body) do
      local c = row.cells
      local def = pandoc.List()
      if n > 2 then
        local facts = pandoc.List()
        for i = 2, n - 1 do
          local v = inlines(c[i])
          if #v > 0 then
            if #facts > 0 then facts:extend({pandoc.Str(";"), pandoc.Space()}) end
            facts:extend({pandoc.Emph({pandoc.Str(header[i] .. ":")}), pandoc.Space()})
            facts:extend(v)
          end
        end
        def:insert(pandoc.Para(facts))
      end
      def:insert(pandoc.Para(inlines(c[n])))
      table.insert(items, {inlines(c[1]), {def}})
    end
  end
  return pandoc.DefinitionList(items)
end
